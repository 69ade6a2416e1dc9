//! Bounds on one inbound WebSocket message, in frames and in time, enforced below tungstenite.
//!
//! tungstenite assembles a fragmented message inside its `read`, looping over frames until the
//! message is complete or the bytes run out, so the `/ws` loop never sees a frame: an endless
//! run of empty continuation frames kept a core busy and a message dripped in one-byte
//! fragments stayed open for as long as the client liked. [`MessageLimitTransport`] sits
//! between the socket and tungstenite and reads the frame headers as the bytes pass (payloads
//! are skipped by length, never copied): a message may have at most [`MAX_MESSAGE_FRAMES`]
//! frames and must be complete within `request_timeout_secs` of its first byte. Past either
//! bound the read fails with a [`MessageLimit`] error, which the `/ws` loop turns into close
//! code 1009 or 1008. It also charges the frames a message has declared to the connection
//! registry while the message is assembled, because tungstenite reserves each frame's whole
//! length as soon as it has read the header.
//!
//! It does not validate framing (reserved bits, masks, control frame rules): tungstenite does,
//! and closes with 1002.

use std::{
    fmt, io,
    pin::Pin,
    sync::Arc,
    task::{Context as TaskContext, Poll},
    time::{Duration, Instant},
};

use async_io::Timer;
use futures_lite::{AsyncRead, Stream};
use trillium::Transport;

use crate::{
    connection::Tracked,
    transport::{async_read_into, forward_async_write, forward_transport},
};

/// Frames one message may have, control frames sent in its middle included. Browsers send a
/// message as one frame; 1,024 frames still carry the default `max_message_bytes` (64 KiB) in
/// 64-byte fragments, and bound the work an endless run of empty fragments can cause.
pub const MAX_MESSAGE_FRAMES: u32 = 1024;

/// Why an inbound message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageLimit {
    /// The message has more than [`MAX_MESSAGE_FRAMES`] frames.
    TooManyFrames,
    /// The message was not complete within `request_timeout_secs` of its first byte.
    TooSlow,
}

impl fmt::Display for MessageLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MessageLimit::TooManyFrames => write!(
                f,
                "message split into more than {MAX_MESSAGE_FRAMES} frames"
            ),
            MessageLimit::TooSlow => {
                f.write_str("message not complete within [daemon] request_timeout_secs")
            }
        }
    }
}

impl std::error::Error for MessageLimit {}

impl MessageLimit {
    /// Returns the limit a read error reports, if it is one of these.
    pub fn of(error: &io::Error) -> Option<MessageLimit> {
        error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<MessageLimit>())
            .copied()
    }

    fn into_io(self) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, self)
    }
}

/// Where the scanner is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Position {
    /// Reading a frame header: `have` of its `need` bytes (`need` grows once byte 1 is known).
    Header { have: usize, need: usize },
    /// Skipping the payload of the current frame.
    Payload { left: u64 },
}

/// A frame header's bytes as far as they are needed: byte 0, byte 1 and the extended length.
#[derive(Debug, Clone, Copy, Default)]
struct Header {
    bytes: [u8; 10],
}

impl Header {
    fn fin(&self) -> bool {
        self.bytes[0] & 0x80 != 0
    }

    fn opcode(&self) -> u8 {
        self.bytes[0] & 0x0f
    }

    /// The header's full length once byte 1 is known: 2, the extended length and the mask.
    fn length(&self) -> usize {
        let extended = match self.bytes[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.bytes[1] & 0x80 != 0 { 4 } else { 0 };
        2 + extended + mask
    }

    fn payload_length(&self) -> u64 {
        match self.bytes[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.bytes[2], self.bytes[3]])),
            127 => u64::from_be_bytes([
                self.bytes[2],
                self.bytes[3],
                self.bytes[4],
                self.bytes[5],
                self.bytes[6],
                self.bytes[7],
                self.bytes[8],
                self.bytes[9],
            ]),
            short => u64::from(short),
        }
    }
}

/// The message being assembled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OpenMessage {
    /// Counts messages, so a caller can tell a new message from the one it saw before.
    serial: u64,
    frames: u32,
    /// Payload bytes its data frames have declared.
    declared: u64,
}

/// Follows the frame headers of a client's byte stream: a pure state machine, no I/O.
#[derive(Debug, Clone)]
pub struct FrameScanner {
    position: Position,
    header: Header,
    /// Whether the frame being read ends a data message (a final data frame).
    ends_message: bool,
    message: Option<OpenMessage>,
    messages: u64,
    max_frames: u32,
}

impl FrameScanner {
    /// Creates a scanner at a frame boundary that allows `max_frames` frames a message.
    pub fn new(max_frames: u32) -> FrameScanner {
        FrameScanner {
            position: Position::Header { have: 0, need: 2 },
            header: Header::default(),
            ends_message: false,
            message: None,
            messages: 0,
            max_frames,
        }
    }

    /// Returns the serial number and the declared payload bytes of the message being
    /// assembled, if one is.
    pub fn open_message(&self) -> Option<(u64, u64)> {
        self.message
            .map(|message| (message.serial, message.declared))
    }

    /// Follows `bytes`. On a violation, returns the offset of the frame that broke the limit
    /// (the bytes before it may still be delivered) and the limit; the scanner must not be fed
    /// again after that.
    pub fn scan(&mut self, bytes: &[u8]) -> Result<(), (usize, MessageLimit)> {
        let mut offset = 0;
        while offset < bytes.len() {
            match self.position {
                Position::Payload { left } => {
                    let available = (bytes.len() - offset) as u64;
                    let skipped = left.min(available);
                    // `skipped` is at most what is left of `bytes`, so it fits in usize.
                    offset += usize::try_from(skipped).unwrap_or(bytes.len() - offset);
                    self.position = Position::Payload {
                        left: left - skipped,
                    };
                    if left == skipped {
                        self.end_frame();
                    }
                }
                Position::Header { have, need } => {
                    let Some(&byte) = bytes.get(offset) else {
                        break;
                    };
                    if have == 0 {
                        self.header = Header::default();
                        self.header.bytes[0] = byte;
                        self.start_frame().map_err(|limit| (offset, limit))?;
                    } else if let Some(slot) = self.header.bytes.get_mut(have) {
                        // Mask bytes (past the tenth) are not needed, only counted.
                        *slot = byte;
                    }
                    offset += 1;
                    let have = have + 1;
                    let need = if have == 2 {
                        self.header.length()
                    } else {
                        need
                    };
                    self.position = if have < need {
                        Position::Header { have, need }
                    } else {
                        self.header_complete();
                        Position::Payload {
                            left: self.header.payload_length(),
                        }
                    };
                    if let Position::Payload { left: 0 } = self.position {
                        self.end_frame();
                    }
                }
            }
        }
        Ok(())
    }

    /// Byte 0 of a frame: a data frame opens or continues a message, and every frame of an
    /// open message counts.
    fn start_frame(&mut self) -> Result<(), MessageLimit> {
        let opcode = self.header.opcode();
        let is_data = opcode < 0x8;
        self.ends_message = is_data && self.header.fin();
        match &mut self.message {
            Some(message) => {
                message.frames = message.frames.saturating_add(1);
                if message.frames > self.max_frames {
                    return Err(MessageLimit::TooManyFrames);
                }
            }
            // Text or binary opens a message; a stray continuation is tungstenite's to refuse.
            None if opcode == 0x1 || opcode == 0x2 => {
                self.messages += 1;
                self.message = Some(OpenMessage {
                    serial: self.messages,
                    frames: 1,
                    declared: 0,
                });
            }
            None => self.ends_message = false,
        }
        Ok(())
    }

    fn header_complete(&mut self) {
        let is_data = self.header.opcode() < 0x8;
        if let (true, Some(message)) = (is_data, &mut self.message) {
            message.declared = message
                .declared
                .saturating_add(self.header.payload_length());
        }
    }

    fn end_frame(&mut self) {
        if self.ends_message {
            self.message = None;
            self.ends_message = false;
        }
        self.position = Position::Header { have: 0, need: 2 };
    }
}

/// The transport under tungstenite on `/ws`: the bounds of [`FrameScanner`], a deadline for
/// each message, and the message's memory charged to its connection.
pub struct MessageLimitTransport {
    inner: Box<dyn Transport>,
    scanner: FrameScanner,
    timeout: Duration,
    /// The open message's serial and when its first byte was read.
    open: Option<(u64, Instant)>,
    timer: Timer,
    /// A violation found in bytes already delivered in part; reported by the next read.
    pending: Option<MessageLimit>,
    tracked: Option<Arc<Tracked>>,
    charged: u64,
}

impl fmt::Debug for MessageLimitTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageLimitTransport")
            .field("scanner", &self.scanner)
            .field("open", &self.open)
            .field("pending", &self.pending)
            .field("charged", &self.charged)
            .finish_non_exhaustive()
    }
}

impl MessageLimitTransport {
    /// Wraps `inner`, whose stream starts with `already_read` (bytes read with the upgrade
    /// request, which tungstenite gets directly); `tracked` is charged for open messages.
    pub fn new(
        inner: Box<dyn Transport>,
        already_read: &[u8],
        timeout: Duration,
        tracked: Option<Arc<Tracked>>,
    ) -> MessageLimitTransport {
        let mut transport = MessageLimitTransport {
            inner,
            scanner: FrameScanner::new(MAX_MESSAGE_FRAMES),
            timeout,
            open: None,
            timer: Timer::never(),
            pending: None,
            tracked,
            charged: 0,
        };
        // These bytes cannot be held back: they are in tungstenite's buffer already.
        if let Err((_, limit)) = transport.scanner.scan(already_read) {
            transport.pending = Some(limit);
        }
        transport.follow_message();
        transport
    }

    /// Starts the deadline of a newly opened message and keeps the charge equal to what the
    /// open message has declared.
    fn follow_message(&mut self) {
        let open = self.scanner.open_message();
        match (open, self.open) {
            (Some((serial, _)), Some((known, _))) if serial == known => {}
            (Some((serial, _)), _) => {
                let now = Instant::now();
                self.open = Some((serial, now));
                self.timer.set_at(now + self.timeout);
            }
            (None, _) => self.open = None,
        }
        let declared = open.map_or(0, |(_, declared)| declared);
        if let Some(tracked) = &self.tracked
            && declared != self.charged
        {
            if declared > self.charged {
                tracked.charge(declared - self.charged);
            } else {
                tracked.release(self.charged - declared);
            }
            self.charged = declared;
        }
    }

    fn expired(&self) -> bool {
        self.open
            .is_some_and(|(_, since)| since.elapsed() >= self.timeout)
    }
}

impl Drop for MessageLimitTransport {
    fn drop(&mut self) {
        if let Some(tracked) = &self.tracked {
            tracked.release(self.charged);
        }
    }
}

async_read_into!(MessageLimitTransport);

impl MessageLimitTransport {
    fn read_into(&mut self, cx: &mut TaskContext<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        if let Some(limit) = self.pending {
            return Poll::Ready(Err(limit.into_io()));
        }
        if self.expired() {
            self.pending = Some(MessageLimit::TooSlow);
            return Poll::Ready(Err(MessageLimit::TooSlow.into_io()));
        }
        let read = match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(read)) => read,
            Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
            Poll::Pending => {
                // Wake at the open message's deadline even if the client sends nothing more.
                if self.open.is_some() && Pin::new(&mut self.timer).poll_next(cx).is_ready() {
                    self.pending = Some(MessageLimit::TooSlow);
                    return Poll::Ready(Err(MessageLimit::TooSlow.into_io()));
                }
                return Poll::Pending;
            }
        };
        let scanned = self.scanner.scan(buf.get(..read).unwrap_or_default());
        self.follow_message();
        match scanned {
            Ok(()) => Poll::Ready(Ok(read)),
            Err((0, limit)) => {
                self.pending = Some(limit);
                Poll::Ready(Err(limit.into_io()))
            }
            // The frames before the offending one reach tungstenite; the next read fails.
            Err((offset, limit)) => {
                self.pending = Some(limit);
                Poll::Ready(Ok(offset))
            }
        }
    }
}

forward_async_write!(MessageLimitTransport, inner);
forward_transport!(MessageLimitTransport, inner);

#[cfg(test)]
mod tests {
    use blufio_testkit::ws::client_frame as frame;

    use super::*;

    #[test]
    fn whole_messages_close_as_soon_as_their_last_byte_passes() {
        let mut scanner = FrameScanner::new(4);
        let stream = [frame(1, true, b"hello"), frame(2, true, &[0; 300])].concat();
        scanner.scan(&stream).unwrap();
        assert_eq!(scanner.open_message(), None);
    }

    #[test]
    fn a_message_stays_open_until_its_final_fragment_and_declares_its_payload() {
        let mut scanner = FrameScanner::new(4);
        scanner.scan(&frame(1, false, b"ab")).unwrap();
        assert_eq!(scanner.open_message(), Some((1, 2)));
        // A ping in the middle counts as a frame but declares nothing.
        scanner.scan(&frame(9, true, b"p")).unwrap();
        scanner.scan(&frame(0, false, &[7; 70_000])).unwrap();
        assert_eq!(scanner.open_message(), Some((1, 70_002)));
        scanner.scan(&frame(0, true, b"")).unwrap();
        assert_eq!(scanner.open_message(), None);
        scanner.scan(&frame(1, false, b"x")).unwrap();
        assert_eq!(scanner.open_message(), Some((2, 1)));
    }

    #[test]
    fn the_frame_past_the_limit_is_refused_at_its_first_byte() {
        let mut scanner = FrameScanner::new(3);
        let stream = [
            frame(1, true, b"done"),
            frame(1, false, b"a"),
            frame(0, false, b""),
            frame(0, false, b""),
        ]
        .concat();
        let before = stream.len();
        let stream = [stream, frame(0, false, b""), frame(0, true, b"")].concat();
        assert_eq!(
            scanner.scan(&stream),
            Err((before, MessageLimit::TooManyFrames))
        );
    }

    #[test]
    fn headers_split_across_reads_are_followed_byte_by_byte() {
        let stream = [
            frame(1, false, &[1; 200]),
            frame(0, false, &[2; 70_000]),
            frame(0, true, b"z"),
        ]
        .concat();
        let mut scanner = FrameScanner::new(MAX_MESSAGE_FRAMES);
        for (index, byte) in stream.iter().enumerate() {
            scanner.scan(std::slice::from_ref(byte)).unwrap();
            let last = index + 1 == stream.len();
            assert_eq!(scanner.open_message().is_none(), last, "at byte {index}");
        }
    }

    #[test]
    fn control_frames_between_messages_open_nothing() {
        let mut scanner = FrameScanner::new(2);
        for _ in 0..10 {
            scanner.scan(&frame(9, true, b"ping")).unwrap();
            scanner.scan(&frame(10, true, b"")).unwrap();
        }
        assert_eq!(scanner.open_message(), None);
    }

    #[test]
    fn limit_errors_survive_the_trip_through_io_errors() {
        let error = MessageLimit::TooSlow.into_io();
        assert_eq!(MessageLimit::of(&error), Some(MessageLimit::TooSlow));
        assert_eq!(MessageLimit::of(&io::ErrorKind::TimedOut.into()), None);
    }
}
