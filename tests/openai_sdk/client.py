"""One scenario of the official `openai` Python package against a blufio gateway.

Driven by tests/integration/openai_sdk.rs: it reads one JSON object from stdin,
{"base_url", "api_key", "scenario", "request"} (stdin, not an argument, so a request may
be larger than a command line), and prints one JSON object on stdout, with the seconds
the scenario took.

Scenarios: "models" (client.models.list()), "chat" (chat.completions.create, with the
x-blufio-model header), "stream" (the same with stream=True, every chunk kept),
"stream_and_leave" (the first text, then the stream closed) and "example" (a documented
snippet, what it prints). An error the SDK raises is printed as {"error": {...}} with
its class name and what the SDK read from the body, so the Rust side asserts on what a
real client sees, not on the raw HTTP.

It deliberately decides nothing of its own: no retries, no fallbacks, no assertions.
"""

import contextlib
import io
import json
import sys
import time

import openai


def client(args):
    return openai.OpenAI(
        base_url=args["base_url"],
        api_key=args["api_key"],
        # One request per scenario: a retry would hide what the first answer was.
        max_retries=0,
        # A broken gateway fails the test instead of hanging it.
        timeout=60.0,
        # Validate every answer against the SDK's own types, so a missing or mistyped
        # field fails here as it would in a stricter client, instead of passing unseen.
        _strict_response_validation=True,
        # Proxy variables of the machine must not reroute a request to 127.0.0.1.
        http_client=openai.DefaultHttpxClient(trust_env=False),
    )


def run(args, seen):
    sdk = client(args)
    scenario = args["scenario"]
    request = args.get("request", {})
    if scenario == "models":
        page = sdk.models.list()
        return {"models": [model.model_dump(mode="json") for model in page.data]}
    if scenario == "chat":
        raw = sdk.chat.completions.with_raw_response.create(**request)
        completion = raw.parse()
        return {
            "completion": completion.model_dump(mode="json"),
            "answered_by": raw.headers.get("x-blufio-model"),
        }
    if scenario == "stream":
        # Kept in `seen`, so what arrived before an error mid-stream is printed with it.
        chunks = seen.setdefault("chunks", [])
        text = []
        with sdk.chat.completions.create(stream=True, **request) as stream:
            for chunk in stream:
                chunks.append(chunk.model_dump(mode="json"))
                for choice in chunk.choices:
                    if choice.delta.content:
                        text.append(choice.delta.content)
        # Reaching here means the SDK saw the end of the stream (`data: [DONE]` or EOF).
        return {"chunks": chunks, "text": "".join(text), "ended": True}
    if scenario == "stream_and_leave":
        # Reads up to the first text, then closes the stream as a client that has what it
        # wanted does (the SDK closes the response when its context ends).
        with sdk.chat.completions.create(stream=True, **request) as stream:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    return {"first": chunk.choices[0].delta.content}
        return {"first": None}
    if scenario == "example":
        # A documented example, run as a reader would with `TOKEN` set; what it prints is
        # the result.
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(request["code"], "example", "exec"), {"TOKEN": args["api_key"]})
        return {"stdout": printed.getvalue()}
    raise SystemExit(f"unknown scenario {scenario!r}")


def describe(error):
    # An error event inside a stream is a plain APIError, with a body but no status.
    described = {
        "class": type(error).__name__,
        "message": str(error),
        "code": error.code,
        "param": error.param,
        "type": getattr(error, "type", None),
        "body": error.body,
    }
    if isinstance(error, openai.APIStatusError):
        described.update(
            status=error.status_code,
            retry_after=error.response.headers.get("retry-after"),
        )
    return described


def main():
    args = json.load(sys.stdin)
    seen = {}
    # Timed here, after the imports, so a loaded machine's slow start of Python does not
    # count as the gateway's time.
    started = time.monotonic()
    try:
        result = run(args, seen)
    except openai.APIError as error:
        result = {"error": describe(error), **seen}
    result["seconds"] = time.monotonic() - started
    print(json.dumps(result))


if __name__ == "__main__":
    main()
