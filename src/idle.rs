//! Connection guards shared by the servers: the hook server and the artifact cache server both
//! close a connection on which nothing has moved for a while, so that whatever can reach them
//! cannot hold connections open for ever by saying nothing.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A connection that fails its reads and writes once no byte has moved either way for `idle`,
/// and holds `K` (a connection permit, say) until dropped. Moving bytes only notes the time (a
/// clock read); the timer is moved only when it fires and bytes have moved since it was set, so
/// a busy connection touches the runtime's timer about once per `idle`, not at every wait.
pub(crate) struct IdleTimeout<S, K = ()> {
    stream: S,
    idle: Duration,
    last_progress: Instant,
    timer: Pin<Box<Sleep>>,
    _held: K,
}

impl<S, K> IdleTimeout<S, K> {
    pub(crate) fn new(stream: S, idle: Duration, held: K) -> Self {
        let now = Instant::now();
        Self {
            stream,
            idle,
            last_progress: now,
            timer: Box::pin(tokio::time::sleep_until(now + idle)),
            _held: held,
        }
    }

    /// After a read or write that must wait: an error once nothing has moved for `idle`, else
    /// pending, with the timer set to wake this task by then.
    fn poll_idle<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        while self.timer.as_mut().poll(cx).is_ready() {
            let due = self.last_progress + self.idle;
            if due <= self.timer.deadline() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no byte moved on the connection for {} s",
                        self.idle.as_secs_f64()
                    ),
                )));
            }
            // Bytes moved since the timer was set: it fired early, so it waits on from there.
            self.timer.as_mut().reset(due);
        }
        Poll::Pending
    }

    /// What a read or write answered: progress when it moved bytes, the idle check when it
    /// must wait.
    fn moved<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
        progress: impl FnOnce(&T) -> bool,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Ready(Ok(value)) => {
                if progress(&value) {
                    self.last_progress = Instant::now();
                }
                Poll::Ready(Ok(value))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.poll_idle(cx),
        }
    }
}

impl<S: AsyncRead + Unpin, K: Unpin> AsyncRead for IdleTimeout<S, K> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        let read = buf.filled().len() > before;
        this.moved(cx, polled, |()| read)
    }
}

impl<S: AsyncWrite + Unpin, K: Unpin> AsyncWrite for IdleTimeout<S, K> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.moved(cx, polled, |&written| written > 0)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.moved(cx, polled, |&written| written > 0)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_flush(cx);
        this.moved(cx, polled, |()| false)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
