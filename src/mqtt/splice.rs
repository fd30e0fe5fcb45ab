//! The relay's bytes moved by splice(2): from one socket into a pipe and from the pipe into the other socket,
//! inside the kernel, so that an image is not copied into imaged and out again on its way between the broker
//! and rumqttc (the relay's largest cost per image: docs/BENCHMARKS.md). TLS is decrypted in imaged, so only
//! a plain TCP connection is spliced.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::{TcpStream, UnixStream};

/// What the pipe is asked to hold: a few reads' worth of a large image at once.
const PIPE_BYTES: libc::c_int = 256 * 1024;

/// A socket tokio drives, whose readiness a splice waits on.
pub trait Socket: AsRawFd {
    async fn wait(&self, interest: Interest) -> io::Result<()>;
    fn attempt(
        &self,
        interest: Interest,
        f: impl FnOnce() -> io::Result<usize>,
    ) -> io::Result<usize>;
}

impl Socket for TcpStream {
    async fn wait(&self, interest: Interest) -> io::Result<()> {
        self.ready(interest).await.map(drop)
    }
    fn attempt(
        &self,
        interest: Interest,
        f: impl FnOnce() -> io::Result<usize>,
    ) -> io::Result<usize> {
        self.try_io(interest, f)
    }
}

impl Socket for UnixStream {
    async fn wait(&self, interest: Interest) -> io::Result<()> {
        self.ready(interest).await.map(drop)
    }
    fn attempt(
        &self,
        interest: Interest,
        f: impl FnOnce() -> io::Result<usize>,
    ) -> io::Result<usize> {
        self.try_io(interest, f)
    }
}

/// The pipe between the two sockets of one direction; empty between two calls of [`Pipe::carry`].
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
}

impl Pipe {
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [0; 2];
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A smaller pipe (the default is 64 KiB) only means more splices.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES) };
        let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        let size = usize::try_from(size).map_err(|_| io::Error::last_os_error())?;
        Ok(Pipe { read, write, size })
    }

    /// Moves what `from` has, at most `most` bytes, into `to`; 0 at the end of `from`. `Unsupported` when
    /// this kernel or this sandbox does not splice from `from` (nothing moved).
    pub async fn carry(
        &self,
        from: &impl Socket,
        to: &impl Socket,
        most: usize,
    ) -> io::Result<usize> {
        let want = most.min(self.size);
        let n = loop {
            from.wait(Interest::READABLE).await?;
            match from.attempt(Interest::READABLE, || {
                splice(from.as_raw_fd(), self.write.as_raw_fd(), want)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                // Nothing moved: the caller may copy instead.
                Err(e) if unsupported(&e) => {
                    return Err(io::Error::new(io::ErrorKind::Unsupported, e))
                }
                other => break other?,
            }
        };
        let mut left = n;
        while left > 0 {
            to.wait(Interest::WRITABLE).await?;
            match to.attempt(Interest::WRITABLE, || {
                splice(self.read.as_raw_fd(), to.as_raw_fd(), left)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => left -= other?,
            }
        }
        Ok(n)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            flags,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Errors that say this kernel (splice from a Unix socket came in Linux 4.5) or a system call filter does not
/// let these sockets splice.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::EPERM | libc::EOPNOTSUPP)
    )
}
