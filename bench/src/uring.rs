//! The floor's io_uring writer (`--floor-io uring`): the same frame sent to
//! many sockets with one `io_uring_enter` per batch instead of one `write`
//! per socket, to measure whether batching the syscalls lowers the
//! kernel's cost per write (#18).
#![allow(unsafe_code)]

use std::io::{self, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;

use io_uring::{IoUring, opcode, types};

/// Submissions per `io_uring_enter`, at most.
const RING_ENTRIES: u32 = 256;

/// An io_uring with the frame it sends. It owns the frame so that the
/// kernel never reads freed memory: the frame changes only between
/// batches, and if a batch cannot be reaped the frame is leaked.
pub struct RingWriter {
    ring: IoUring,
    frame: Vec<u8>,
    in_flight: usize,
}

impl RingWriter {
    pub fn new(frame: Vec<u8>) -> io::Result<RingWriter> {
        Ok(RingWriter {
            ring: IoUring::new(RING_ENTRIES)?,
            frame,
            in_flight: 0,
        })
    }

    /// The frame, to stamp between batches.
    pub fn frame_mut(&mut self) -> &mut [u8] {
        assert_eq!(self.in_flight, 0, "the kernel may still read the frame");
        &mut self.frame
    }

    /// Sends the frame to every socket, a ring's worth per submission, and
    /// finishes a short send with a blocking write. The first error comes
    /// back once every send of its batch has completed.
    pub fn send_to_all(&mut self, sockets: &mut [TcpStream]) -> io::Result<()> {
        let mut first_error = None;
        for batch in sockets.chunks_mut(RING_ENTRIES as usize) {
            {
                let mut queue = self.ring.submission();
                for (i, socket) in batch.iter().enumerate() {
                    let send = opcode::Send::new(
                        types::Fd(socket.as_raw_fd()),
                        self.frame.as_ptr(),
                        self.frame.len() as u32,
                    )
                    .build()
                    .user_data(i as u64);
                    // SAFETY: the frame is owned by `self` and is neither
                    // changed nor freed while `in_flight` > 0 (`frame_mut`
                    // asserts, `Drop` leaks it); the socket's file is held
                    // by the kernel for the operation's life.
                    unsafe { queue.push(&send) }.map_err(|_| io::Error::other("ring full"))?;
                    self.in_flight += 1;
                }
            }
            while self.in_flight > 0 {
                match self.ring.submit_and_wait(self.in_flight) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // Nothing can be reaped: leave the frame to `Drop`.
                    Err(e) => return Err(e),
                }
                let done: Vec<(usize, i32)> = self
                    .ring
                    .completion()
                    .map(|c| (c.user_data() as usize, c.result()))
                    .collect();
                self.in_flight -= done.len();
                for (i, sent) in done {
                    let result = if sent < 0 {
                        Err(io::Error::from_raw_os_error(-sent))
                    } else {
                        batch[i].write_all(&self.frame[sent as usize..])
                    };
                    if let Err(e) = result {
                        first_error.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = first_error.take() {
                return Err(e);
            }
        }
        Ok(())
    }
}

impl Drop for RingWriter {
    fn drop(&mut self) {
        if self.in_flight > 0 {
            std::mem::forget(std::mem::take(&mut self.frame));
        }
    }
}
