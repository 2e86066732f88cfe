//! Zero-copy tunnels between two TCP sockets on Linux: `splice(2)` moves the
//! bytes socket -> pipe -> socket inside the kernel, so a bulk CONNECT stream
//! never crosses user space. The system calls go through `nix`'s safe
//! wrappers; readiness comes from tokio.
//!
//! [`Tunnel`] is a hand-written future rather than an `async fn`: it waits
//! with `poll_read_ready` / `poll_write_ready`, which keep the waker in the
//! socket's own registration, so an idle tunnel is two sockets, two counters
//! and a timer (a few hundred bytes). The pipe of a direction is created on
//! its first bytes and closed when the direction has drained, so an idle
//! tunnel holds no pipe either.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use nix::fcntl::{splice, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::deadline::Stall;

/// Most bytes moved per splice call into a pipe of the default size.
const CHUNK: usize = 64 * 1024;
/// A busy direction's pipe is enlarged to this: fewer, larger splices
/// (one stream through the relay: 3,649 -> 4,390 MB/s, medians of 3).
const BIG_PIPE: usize = 256 * 1024;
/// At most this many pipes are enlarged at once. The kernel counts pipe
/// capacity against the user's `fs.pipe-user-pages-soft` (64 MiB by
/// default), past which every new pipe of that user gets a single page;
/// 64 x 256 KiB keeps the relay at a quarter of it.
const BIG_PIPES: usize = 64;
static BIG_IN_USE: AtomicUsize = AtomicUsize::new(0);
/// Splice calls per direction before a busy tunnel lets other tasks run.
const BUDGET: usize = 32;

fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// A pipe between two splices, enlarged while few others are.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    /// Bytes it holds.
    cap: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(errno)?;
        let mut pipe = Pipe { r, w, cap: CHUNK };
        if BIG_IN_USE.fetch_add(1, Ordering::Relaxed) < BIG_PIPES {
            let size = i32::try_from(BIG_PIPE).unwrap_or(i32::MAX);
            match nix::fcntl::fcntl(pipe.w.as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(size)) {
                Ok(_) => pipe.cap = BIG_PIPE,
                Err(_) => {
                    BIG_IN_USE.fetch_sub(1, Ordering::Relaxed);
                }
            }
        } else {
            BIG_IN_USE.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(pipe)
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        if self.cap == BIG_PIPE {
            BIG_IN_USE.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// One direction of a tunnel.
#[derive(Default)]
struct Direction {
    /// Bytes read ahead of the tunnel, written first.
    first: Bytes,
    /// While bytes are in flight.
    pipe: Option<Pipe>,
    /// Bytes in the pipe not yet written on.
    pending: usize,
    /// Bytes moved.
    moved: u64,
    /// End of stream seen and passed on.
    done: bool,
}

impl Direction {
    /// End of stream from the source: passed on as a half-close.
    fn end(&mut self, dst: &TcpStream) -> io::Result<()> {
        self.pipe = None;
        self.done = true;
        nix::sys::socket::shutdown(dst.as_raw_fd(), nix::sys::socket::Shutdown::Write)
            .map_err(errno)
    }

    /// Moves what `src` has to `dst` until it would block (`Pending`), the
    /// stream ends (the half-close is passed on), or the budget is spent.
    fn poll_move(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        active: &mut bool,
    ) -> Poll<io::Result<()>> {
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
        while !self.first.is_empty() {
            ready!(dst.poll_write_ready(cx))?;
            match dst.try_write(&self.first) {
                Ok(n) => {
                    self.first.advance(n);
                    self.moved += n as u64;
                    *active = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.first = Bytes::new();
        for _ in 0..BUDGET {
            while self.pending > 0 {
                let Some(Pipe { r: pipe_r, .. }) = self.pipe.as_ref() else {
                    self.pending = 0;
                    break;
                };
                ready!(dst.poll_write_ready(cx))?;
                match dst.try_io(Interest::WRITABLE, || {
                    splice(pipe_r.as_fd(), None, dst.as_fd(), None, self.pending, flags)
                        .map_err(errno)
                }) {
                    Ok(n) => self.pending -= n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if src.poll_read_ready(cx)?.is_pending() {
                // Drained and waiting: give the pipe back while idle.
                self.pipe = None;
                return Poll::Pending;
            }
            if self.pipe.is_none() {
                // Peek before making a pipe: a direction that only ends
                // costs one recv, not pipe2 + fcntl + splice + two closes
                // (most of a short tunnel's system calls).
                let mut probe = [0u8; 1];
                match ready!(src.poll_peek(cx, &mut tokio::io::ReadBuf::new(&mut probe))) {
                    Ok(0) => return Poll::Ready(self.end(dst)),
                    Ok(_) => self.pipe = Some(Pipe::new()?),
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            let Some(Pipe { w: pipe_w, cap, .. }) = self.pipe.as_ref() else {
                continue;
            };
            // The pipe is always drained above, so EAGAIN here means the socket has nothing.
            match src.try_io(Interest::READABLE, || {
                splice(src.as_fd(), None, pipe_w.as_fd(), None, *cap, flags).map_err(errno)
            }) {
                Ok(0) => return Poll::Ready(self.end(dst)),
                Ok(n) => {
                    self.pending = n;
                    self.moved += n as u64;
                    *active = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        // Still busy: run again after the other tasks had a turn.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// A tunnel between two TCP sockets: resolves when both directions have
/// ended, either fails, or nothing moved for the idle timeout.
pub struct Tunnel {
    a: TcpStream,
    b: TcpStream,
    a_to_b: Direction,
    b_to_a: Direction,
    idle: Duration,
    last: Instant,
    /// Boxed: `Sleep` is `!Unpin`, and this keeps the tunnel `Unpin`.
    timer: Pin<Box<Sleep>>,
}

impl Tunnel {
    /// `a_first` / `b_first`: bytes read from `a` / `b` before the tunnel.
    pub fn new(a: TcpStream, b: TcpStream, a_first: Bytes, b_first: Bytes, idle: Duration) -> Self {
        let last = Instant::now();
        Tunnel {
            a,
            b,
            a_to_b: Direction {
                first: a_first,
                ..Direction::default()
            },
            b_to_a: Direction {
                first: b_first,
                ..Direction::default()
            },
            idle,
            last,
            timer: Box::pin(tokio::time::sleep_until(last + idle)),
        }
    }

    /// Bytes moved so far: `(a to b, b to a)`.
    pub fn moved(&self) -> (u64, u64) {
        (self.a_to_b.moved, self.b_to_a.moved)
    }
}

impl Future for Tunnel {
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let t = self.get_mut();
        let mut active = false;
        if !t.a_to_b.done {
            if let Poll::Ready(Err(e)) = t.a_to_b.poll_move(cx, &t.a, &t.b, &mut active) {
                return Poll::Ready(Err(e));
            }
        }
        if !t.b_to_a.done {
            if let Poll::Ready(Err(e)) = t.b_to_a.poll_move(cx, &t.b, &t.a, &mut active) {
                return Poll::Ready(Err(e));
            }
        }
        if t.a_to_b.done && t.b_to_a.done {
            return Poll::Ready(Ok(()));
        }
        if active {
            t.last = Instant::now();
        }
        // The idle timer: rearmed from the last activity when it fires early.
        while t.timer.as_mut().poll(cx).is_ready() {
            let deadline = t.last + t.idle;
            if Instant::now() >= deadline {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "idle")));
            }
            t.timer.as_mut().reset(deadline);
        }
        Poll::Pending
    }
}

/// Which end of a [`copy_exact`] failed.
#[derive(Debug)]
pub enum CopyFailed {
    /// Reading from the source (an early end of stream is `UnexpectedEof`).
    Read(io::Error),
    /// Writing to the destination.
    Write(io::Error),
}

/// Moves exactly `len` bytes from `src` to `dst` through a pipe of its own,
/// never through user space: a large response body whose length is known.
/// The pipe is closed when the body has passed. A side that stalls past
/// `stall` ends it (`TimedOut`).
pub async fn copy_exact(
    src: &TcpStream,
    dst: &TcpStream,
    len: u64,
    stall: &mut Stall<'_>,
) -> Result<u64, CopyFailed> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let pipe = Pipe::new().map_err(CopyFailed::Read)?;
    let (pipe_r, pipe_w) = (&pipe.r, &pipe.w);
    let (mut left, mut pending) = (len, 0usize);
    while left > 0 || pending > 0 {
        if pending > 0 {
            stall
                .write(dst.writable())
                .await
                .map_err(CopyFailed::Write)?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(pipe_r.as_fd(), None, dst.as_fd(), None, pending, flags).map_err(errno)
            }) {
                Ok(n) => pending -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(CopyFailed::Write(e)),
            }
            continue;
        }
        stall.read(src.readable()).await.map_err(CopyFailed::Read)?;
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(pipe.cap);
        match src.try_io(Interest::READABLE, || {
            splice(src.as_fd(), None, pipe_w.as_fd(), None, want, flags).map_err(errno)
        }) {
            Ok(0) => return Err(CopyFailed::Read(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => {
                pending = n;
                left -= n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(CopyFailed::Read(e)),
        }
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_so_many_pipes_are_enlarged_and_the_slots_come_back() {
        let pipes: Vec<Pipe> = (0..BIG_PIPES + 6).map(|_| Pipe::new().unwrap()).collect();
        let big = pipes.iter().filter(|p| p.cap == BIG_PIPE).count();
        assert!(big <= BIG_PIPES, "{big} enlarged pipes");
        assert!(
            pipes.iter().any(|p| p.cap == CHUNK),
            "every pipe was enlarged"
        );
        drop(pipes);
        assert_eq!(Pipe::new().unwrap().cap, BIG_PIPE);
    }
}
