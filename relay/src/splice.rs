//! Zero-copy tunnels between two TCP sockets on Linux: `splice(2)` moves the
//! bytes socket -> pipe -> socket inside the kernel, so a bulk CONNECT stream
//! never crosses user space. The pipe of a direction is created on its first
//! bytes, so an idle tunnel holds no buffer at all. The system calls go
//! through `nix`'s safe wrappers; readiness comes from tokio.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use nix::fcntl::{splice, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Most bytes moved per splice call (the default pipe holds 64 KiB).
const CHUNK: usize = 64 * 1024;

fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Writes `first` (bytes read ahead of the tunnel) to `dst`.
async fn write_first(dst: &TcpStream, mut first: Bytes) -> io::Result<()> {
    while !first.is_empty() {
        dst.writable().await?;
        match dst.try_write(&first) {
            Ok(n) => {
                let _ = first.split_to(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One direction: replay `first`, then splice until EOF, then pass the half-close on.
pub async fn direction(
    src: &TcpStream,
    dst: &TcpStream,
    first: Bytes,
    count: &AtomicU64,
    last: &AtomicU64,
    start: Instant,
) -> io::Result<()> {
    count.fetch_add(first.len() as u64, Ordering::Relaxed);
    write_first(dst, first).await?;
    let mut pipe: Option<(OwnedFd, OwnedFd)> = None;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        src.readable().await?;
        if pipe.is_none() {
            pipe = Some(nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(errno)?);
        }
        let Some((pipe_r, pipe_w)) = pipe.as_ref() else {
            continue;
        };
        // The pipe is always drained below, so EAGAIN here means the socket has nothing.
        let moved = src.try_io(Interest::READABLE, || {
            splice(src.as_fd(), None, pipe_w.as_fd(), None, CHUNK, flags).map_err(errno)
        });
        let mut pending = match moved {
            Ok(0) => {
                nix::sys::socket::shutdown(dst.as_raw_fd(), nix::sys::socket::Shutdown::Write)
                    .map_err(errno)?;
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        count.fetch_add(pending as u64, Ordering::Relaxed);
        last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        while pending > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(pipe_r.as_fd(), None, dst.as_fd(), None, pending, flags).map_err(errno)
            }) {
                Ok(n) => pending -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}
