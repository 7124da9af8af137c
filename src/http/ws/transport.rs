//! The websocket's transport: the upgraded connection, read ahead in large reads into a
//! buffer of the worker thread, so that a connection holds read bytes only while they wait
//! for the frame parser, and an idle connection holds none.
//!
//! The frame parser asks for a little at a time (its own buffer is kept small because every
//! connection has one for its whole life). Without the read-ahead each of those asks would
//! be a system call; with it, one call reads up to `SCRATCH` bytes and the parser's asks are
//! copies from what is waiting.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most one system call reads.
const SCRATCH: usize = 64 * 1024;

thread_local! {
    /// Where reads land before they are handed out; one per worker thread.
    static SCRATCH_BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A connection read ahead; writes go straight through.
pub(crate) struct ReadAhead<T> {
    io: T,
    /// Read and not yet handed out, from `start` on; no allocation while nothing waits.
    waiting: Vec<u8>,
    start: usize,
}

impl<T> ReadAhead<T> {
    pub(crate) fn new(io: T) -> Self {
        Self {
            io,
            waiting: Vec::new(),
            start: 0,
        }
    }

    /// Hands out what is waiting, as much as `buf` takes; frees the buffer once it is empty.
    fn hand_out(&mut self, buf: &mut ReadBuf<'_>) {
        let n = (self.waiting.len() - self.start).min(buf.remaining());
        buf.put_slice(&self.waiting[self.start..self.start + n]);
        self.start += n;
        if self.start == self.waiting.len() {
            self.waiting = Vec::new();
            self.start = 0;
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.start < this.waiting.len() {
            this.hand_out(buf);
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() >= SCRATCH {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        SCRATCH_BUFFER.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            if scratch.len() < SCRATCH {
                scratch.resize(SCRATCH, 0);
            }
            let mut landed = ReadBuf::new(&mut scratch[..]);
            match Pin::new(&mut this.io).poll_read(cx, &mut landed) {
                Poll::Ready(Ok(())) => {
                    let read = landed.filled();
                    let n = read.len().min(buf.remaining());
                    buf.put_slice(&read[..n]);
                    if n < read.len() {
                        this.waiting = read[n..].to_vec();
                        this.start = 0;
                    }
                    Poll::Ready(Ok(()))
                }
                other => other,
            }
        })
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_are_served_from_one_large_read_and_nothing_is_kept_after() {
        let (mut client, server) = tokio::io::duplex(256 * 1024);
        let sent: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        client.write_all(&sent).await.expect("write");
        drop(client);
        let mut reader = ReadAhead::new(server);
        let mut got = Vec::new();
        let mut small = [0u8; 100];
        loop {
            let n = reader.read(&mut small).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&small[..n]);
            // What waits is never more than one read's worth.
            assert!(reader.waiting.len() <= SCRATCH);
        }
        assert_eq!(got, sent);
        assert_eq!(
            reader.waiting.capacity(),
            0,
            "nothing kept once all is read"
        );
    }

    #[tokio::test]
    async fn large_reads_go_straight_to_the_caller() {
        let (mut client, server) = tokio::io::duplex(256 * 1024);
        client.write_all(&[7u8; 1000]).await.expect("write");
        let mut reader = ReadAhead::new(server);
        let mut large = vec![0u8; SCRATCH];
        let n = reader.read(&mut large).await.expect("read");
        assert_eq!(n, 1000);
        assert!(large[..n].iter().all(|&b| b == 7));
        assert_eq!(reader.waiting.capacity(), 0);
    }
}
