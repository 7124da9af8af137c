//! Just enough of Redis's wire protocol (RESP2) for the bus's two hot connections: commands
//! written straight into one buffer, replies and pub/sub messages parsed straight from the
//! read buffer, payloads handed on as slices of it (no copy, no task between the socket and
//! the bus). The registry keeps the full client; this is only the frames' path.

use std::path::PathBuf;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use secrecy::{ExposeSecret, SecretString};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::bus::BusError;

/// The longest status or error line accepted.
const MAX_LINE: usize = 16 << 10;
/// The most items of one array reply: the bus's replies and messages have two or three.
const MAX_ITEMS: usize = 64;
/// How deeply arrays may nest: the bus's replies are flat arrays.
const MAX_DEPTH: usize = 2;

/// One reply or message from Redis.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Reply {
    /// `+OK`, `+PONG`.
    Status(Bytes),
    /// `-ERR ...`: the command was refused.
    Error(String),
    /// `:n`.
    Integer(i64),
    /// `$n`, or nil.
    Bulk(Option<Bytes>),
    /// `*n`, or nil.
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The bytes of a bulk or status reply.
    pub(crate) fn bytes(&self) -> Option<&Bytes> {
        match self {
            Reply::Bulk(Some(b)) | Reply::Status(b) => Some(b),
            _ => None,
        }
    }
}

/// Redis sent something this client cannot read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("Redis sent an unreadable reply: {0}")]
pub(crate) struct RespError(&'static str);

impl From<RespError> for BusError {
    fn from(e: RespError) -> Self {
        BusError(e.to_string())
    }
}

/// Appends one command (an array of bulk strings) to `out`.
pub(crate) fn put_command(out: &mut BytesMut, args: &[&[u8]]) {
    put_header(out, b'*', args.len());
    for arg in args {
        put_header(out, b'$', arg.len());
        out.put_slice(arg);
        out.put_slice(b"\r\n");
    }
}

fn put_header(out: &mut BytesMut, kind: u8, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.put_u8(kind);
    out.put_slice(&digits[at..]);
    out.put_slice(b"\r\n");
}

/// Takes the first complete reply off `buf`, whose bulk strings may be at most `max_bulk`
/// bytes; `None` until all of it has arrived.
pub(crate) fn take_reply(buf: &mut BytesMut, max_bulk: usize) -> Result<Option<Reply>, RespError> {
    let Some(len) = reply_len(buf, 0, 0, max_bulk)? else {
        return Ok(None);
    };
    let mut whole = buf.split_to(len).freeze();
    // `reply_len` proved it whole and well formed.
    decode(&mut whole, max_bulk)
        .ok_or(RespError("a reply that changed while read"))
        .map(Some)
}

/// The line starting at `at` (without its CRLF) and where the next one starts.
fn line(buf: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, RespError> {
    let rest = buf.get(at..).unwrap_or_default();
    let window = &rest[..rest.len().min(MAX_LINE + 2)];
    match window.windows(2).position(|w| w == b"\r\n") {
        Some(end) => Ok(Some((&rest[..end], at + end + 2))),
        None if window.len() >= MAX_LINE + 2 => Err(RespError("a line without an end")),
        None => Ok(None),
    }
}

fn number(digits: &[u8]) -> Result<i64, RespError> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(RespError("a length or integer that is not a number"))
}

/// A length field: -1 (nil) or 0..=max.
fn length(digits: &[u8], max: usize) -> Result<Option<usize>, RespError> {
    match number(digits)? {
        -1 => Ok(None),
        n if n >= 0 && (n as u64) <= max as u64 => Ok(Some(n as usize)),
        _ => Err(RespError("a length out of bounds")),
    }
}

/// How many bytes the reply starting at `at` takes, once all of it is in `buf`.
fn reply_len(
    buf: &[u8],
    at: usize,
    depth: usize,
    max_bulk: usize,
) -> Result<Option<usize>, RespError> {
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    let Some((text, next)) = line(buf, at + 1)? else {
        return Ok(None);
    };
    let end = match kind {
        b'+' | b'-' => next,
        b':' => {
            number(text)?;
            next
        }
        b'$' => match length(text, max_bulk)? {
            None => next,
            Some(n) => {
                let end = next + n + 2;
                if buf.len() < end {
                    return Ok(None);
                }
                if &buf[end - 2..end] != b"\r\n" {
                    return Err(RespError("a bulk string without its end"));
                }
                end
            }
        },
        b'*' => {
            if depth >= MAX_DEPTH {
                return Err(RespError("arrays nested too deeply"));
            }
            let mut end = next;
            for _ in 0..length(text, MAX_ITEMS)?.unwrap_or(0) {
                match reply_len(buf, end, depth + 1, max_bulk)? {
                    Some(item) => end = item,
                    None => return Ok(None),
                }
            }
            end
        }
        _ => return Err(RespError("an unknown reply type")),
    };
    Ok(Some(end))
}

/// Decodes a reply known to be whole, advancing `data` past it.
fn decode(data: &mut Bytes, max_bulk: usize) -> Option<Reply> {
    let kind = *data.first()?;
    let end = data.windows(2).position(|w| w == b"\r\n")?;
    let text = data.slice(1..end);
    data.advance(end + 2);
    Some(match kind {
        b'+' => Reply::Status(text),
        b'-' => Reply::Error(String::from_utf8_lossy(&text).into_owned()),
        b':' => Reply::Integer(number(&text).ok()?),
        b'$' => match length(&text, max_bulk).ok()? {
            None => Reply::Bulk(None),
            Some(n) => {
                let bulk = data.slice(..n);
                data.advance(n + 2);
                Reply::Bulk(Some(bulk))
            }
        },
        b'*' => match length(&text, MAX_ITEMS).ok()? {
            None => Reply::Array(None),
            Some(n) => {
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(decode(data, max_bulk)?);
                }
                Reply::Array(Some(items))
            }
        },
        _ => return None,
    })
}

/// Where Redis is and how to sign in, read from the `--redis-uri` by the Redis client.
#[derive(Clone)]
pub(crate) struct Target {
    addr: Addr,
    username: Option<String>,
    password: Option<SecretString>,
}

#[derive(Clone, Debug)]
enum Addr {
    Tcp(String, u16),
    Unix(PathBuf),
}

impl Target {
    /// The address and credentials of `client`'s URI.
    pub(crate) fn of(client: &redis::Client) -> Result<Self, BusError> {
        let info = client.get_connection_info();
        let addr = match info.addr() {
            redis::ConnectionAddr::Tcp(host, port) => Addr::Tcp(host.clone(), *port),
            redis::ConnectionAddr::Unix(path) => Addr::Unix(path.clone()),
            _ => return Err(BusError("TLS to Redis is not supported".into())),
        };
        let settings = info.redis_settings();
        Ok(Self {
            addr,
            username: settings.username().map(str::to_string),
            password: settings
                .password()
                .map(|p| SecretString::from(p.to_string())),
        })
    }
}

/// A socket to Redis: TCP or a unix socket.
enum Io {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// One signed-in connection to Redis, with its read buffer.
pub(crate) struct Conn {
    io: Io,
    /// What has arrived and is not yet taken as replies.
    read: BytesMut,
    /// The longest bulk string accepted (a frame with its header); more is a broken or
    /// hostile peer, and the connection is dropped rather than the buffer grown.
    max_bulk: usize,
}

/// The read buffer's free room before each read.
const READ_ROOM: usize = 64 << 10;

impl Conn {
    /// Connects and signs in, within `timeout`; bulk strings longer than `max_bulk` will be
    /// refused.
    pub(crate) async fn open(
        target: &Target,
        timeout: Duration,
        max_bulk: usize,
    ) -> Result<Self, BusError> {
        tokio::time::timeout(timeout, Self::open_now(target, max_bulk))
            .await
            .map_err(|_| BusError("no answer from Redis".into()))?
    }

    async fn open_now(target: &Target, max_bulk: usize) -> Result<Self, BusError> {
        let unreachable = |e: std::io::Error| BusError(format!("cannot connect to Redis: {e}"));
        let io = match &target.addr {
            Addr::Tcp(host, port) => {
                let stream = TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(unreachable)?;
                // Frames are small and latency matters: no Nagle delay.
                stream.set_nodelay(true).map_err(unreachable)?;
                Io::Tcp(stream)
            }
            Addr::Unix(path) => Io::Unix(UnixStream::connect(path).await.map_err(unreachable)?),
        };
        let mut conn = Self {
            io,
            read: BytesMut::with_capacity(READ_ROOM),
            max_bulk,
        };
        if let Some(password) = &target.password {
            let mut out = BytesMut::new();
            let secret = password.expose_secret().as_bytes();
            match &target.username {
                Some(user) => put_command(&mut out, &[b"AUTH", user.as_bytes(), secret]),
                None => put_command(&mut out, &[b"AUTH", secret]),
            }
            conn.write(&out).await?;
            match conn.reply().await? {
                Reply::Status(_) => {}
                Reply::Error(e) => return Err(BusError(format!("Redis refused to sign in: {e}"))),
                _ => return Err(BusError("Redis answered AUTH with something else".into())),
            }
        }
        Ok(conn)
    }

    /// Writes all of `data`.
    pub(crate) async fn write(&mut self, data: &[u8]) -> Result<(), BusError> {
        let written = match &mut self.io {
            Io::Tcp(s) => s.write_all(data).await,
            Io::Unix(s) => s.write_all(data).await,
        };
        written.map_err(|e| BusError(format!("lost the connection to Redis: {e}")))
    }

    /// Reads more into the buffer; cancel-safe (nothing is lost when the read is dropped).
    pub(crate) async fn fill(&mut self) -> Result<(), BusError> {
        if self.read.capacity() - self.read.len() < READ_ROOM / 4 {
            self.read.reserve(READ_ROOM);
        }
        let n = match &mut self.io {
            Io::Tcp(s) => s.read_buf(&mut self.read).await,
            Io::Unix(s) => s.read_buf(&mut self.read).await,
        }
        .map_err(|e| BusError(format!("lost the connection to Redis: {e}")))?;
        if n == 0 {
            return Err(BusError("Redis closed the connection".into()));
        }
        Ok(())
    }

    /// The next reply already read, if whole.
    pub(crate) fn take_reply(&mut self) -> Result<Option<Reply>, RespError> {
        take_reply(&mut self.read, self.max_bulk)
    }

    /// The next reply, reading until it is whole.
    pub(crate) async fn reply(&mut self) -> Result<Reply, BusError> {
        loop {
            if let Some(reply) = self.take_reply()? {
                return Ok(reply);
            }
            self.fill().await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(wire: &[u8]) -> Result<Vec<Reply>, RespError> {
        let mut buf = BytesMut::from(wire);
        let mut out = Vec::new();
        while let Some(reply) = take_reply(&mut buf, 1 << 20)? {
            out.push(reply);
        }
        assert!(buf.is_empty(), "left over: {buf:?}");
        Ok(out)
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = BytesMut::new();
        put_command(&mut out, &[b"PUBLISH", b"ch", b"a\r\nb"]);
        assert_eq!(
            &out[..],
            b"*3\r\n$7\r\nPUBLISH\r\n$2\r\nch\r\n$4\r\na\r\nb\r\n"
        );
    }

    #[test]
    fn replies_and_messages_parse() {
        let wire = b"+OK\r\n-ERR no\r\n:42\r\n$-1\r\n*-1\r\n$0\r\n\r\n\
            *3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$4\r\na\r\nb\r\n";
        let replies = all(wire).unwrap();
        assert_eq!(
            replies,
            [
                Reply::Status(Bytes::from_static(b"OK")),
                Reply::Error("ERR no".into()),
                Reply::Integer(42),
                Reply::Bulk(None),
                Reply::Array(None),
                Reply::Bulk(Some(Bytes::new())),
                Reply::Array(Some(vec![
                    Reply::Bulk(Some(Bytes::from_static(b"message"))),
                    Reply::Bulk(Some(Bytes::from_static(b"ch"))),
                    Reply::Bulk(Some(Bytes::from_static(b"a\r\nb"))),
                ])),
            ]
        );
    }

    #[test]
    fn a_reply_cut_anywhere_waits_for_the_rest() {
        let wire: &[u8] = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$4\r\na\r\nb\r\n:7\r\n";
        for cut in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..cut]);
            let first = take_reply(&mut buf, 1 << 20).unwrap();
            if cut < wire.len() - 4 {
                assert_eq!(first, None, "cut at {cut}");
                assert_eq!(buf.len(), cut, "nothing taken at {cut}");
            }
            buf.extend_from_slice(&wire[cut..]);
            let mut got = Vec::new();
            if let Some(r) = first {
                got.push(r);
            }
            while let Some(r) = take_reply(&mut buf, 1 << 20).unwrap() {
                got.push(r);
            }
            assert_eq!(got.len(), 2, "cut at {cut}");
            assert_eq!(got[1], Reply::Integer(7));
        }
    }

    #[test]
    fn broken_or_hostile_replies_are_errors() {
        for wire in [
            &b"?what\r\n"[..],
            b":12x\r\n",
            b"$-2\r\n",
            b"$3\r\nabcd\r\n",
            b"*65\r\n",
            b"$1048577\r\n",
            b"*1\r\n*1\r\n*1\r\n:1\r\n",
        ] {
            assert!(all(wire).is_err(), "{:?}", String::from_utf8_lossy(wire));
        }
        let endless = vec![b'+'; MAX_LINE + 8];
        assert!(all(&endless).is_err());
    }
}
