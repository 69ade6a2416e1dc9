//! `/ws` with a real WebSocket client.

use blufio::Config;

use crate::support::{self, TOKEN, start_gateway, wait_for_active_sessions};

#[test]
fn a_websocket_conversation_is_one_session() {
    let daemon = start_gateway(Config::for_tests());
    let mut ws = support::ws_authed(&daemon);
    assert_eq!(daemon.get("/health").json()["active_sessions"], 1);

    let first = support::ws_exchange(&mut ws, r#"{"content": "hello"}"#);
    assert_eq!(first["content"], "re: hello (history 0)");
    let id = first["session_id"].as_str().unwrap().to_owned();
    let second = support::ws_exchange(&mut ws, r#"{"content": "more"}"#);
    assert_eq!(second["content"], "re: more (history 2)");
    assert_eq!(second["session_id"], id.as_str());
    let listed = daemon
        .authed(TOKEN, "GET", &format!("/v1/sessions/{id}"), None)
        .json();
    assert_eq!(listed["kind"], "websocket");

    // Bad frames get error frames; the connection stays up.
    let bad = support::ws_exchange(&mut ws, "not json");
    assert_eq!(bad["error"], "invalid_json");
    let mismatch = support::ws_exchange(
        &mut ws,
        r#"{"session_id": "00000000000000000000000000000000", "content": "x"}"#,
    );
    assert_eq!(mismatch["error"], "session_mismatch");
    let upstream = support::ws_exchange(&mut ws, r#"{"content": "upstream"}"#);
    assert_eq!(upstream["error"], "agent_upstream");
    let after = support::ws_exchange(&mut ws, r#"{"content": "still"}"#);
    assert_eq!(after["content"], "re: still (history 4)");

    async_io::block_on(ws.close(None)).unwrap();
    wait_for_active_sessions(&daemon, 0);
    assert_eq!(
        support::metric(&daemon, "blufio_messages_total", &[("channel", "ws")]),
        Some(4.0)
    );
    daemon.stop();
}

#[test]
fn browsers_authenticate_with_the_bearer_subprotocol() {
    let daemon = start_gateway(Config::for_tests());
    let protocols = format!("blufio.v1, bearer.{TOKEN}");
    let (mut ws, selected) = support::ws_connect(
        daemon.gateway_addr(),
        &[("Sec-WebSocket-Protocol", &protocols)],
    )
    .unwrap();
    assert_eq!(
        selected.as_deref(),
        Some("blufio.v1"),
        "the token is never echoed"
    );
    let reply = support::ws_exchange(&mut ws, r#"{"content": "hi"}"#);
    assert_eq!(reply["content"], "re: hi (history 0)");
    let wrong = support::ws_connect(
        daemon.gateway_addr(),
        &[("Sec-WebSocket-Protocol", "blufio.v1, bearer.wrong")],
    );
    assert_eq!(wrong.map(|_| ()).unwrap_err().0, 401);
    daemon.stop();
}

#[test]
fn dropped_websockets_release_their_sessions() {
    let daemon = start_gateway(Config::for_tests());
    let auth = format!("Bearer {TOKEN}");
    let clients: Vec<_> = (0..50)
        .map(|_| support::ws_connect(daemon.gateway_addr(), &[("Authorization", &auth)]).unwrap())
        .collect();
    assert_eq!(daemon.get("/health").json()["active_sessions"], 50);
    // Dropped without a close frame, as a crashed client or a lost network would.
    drop(clients);
    wait_for_active_sessions(&daemon, 0);
    daemon.stop();
}

#[test]
fn shutdown_closes_websockets_with_going_away() {
    let daemon = start_gateway(Config::for_tests());
    let mut ws = support::ws_authed(&daemon);
    let stopper = std::thread::spawn(move || daemon.stop());
    let frame = async_io::block_on(async { support::ws_close_frame(&mut ws).await });
    assert_eq!(u16::from(frame.unwrap().code), 1001);
    stopper.join().unwrap();
}

#[test]
fn a_plain_get_on_ws_gets_426() {
    let daemon = start_gateway(Config::for_tests());
    daemon
        .authed(TOKEN, "GET", "/ws", None)
        .assert_error(426, "upgrade_required");
    daemon.stop();
}
