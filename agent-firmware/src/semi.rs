//! Host files through Arm semihosting (QEMU `-semihosting-config enable=on,target=native`).
//!
//! The only `unsafe` in the firmware besides the stack scan: each call is a `bkpt 0xab` trap
//! that QEMU serves, with a pointer to an argument block that lives on our stack for the
//! duration of the call. Paths are relative to QEMU's working directory.
#![allow(unsafe_code)]

use cortex_m_semihosting::{nr, syscall};

/// An open host file.
pub(crate) struct HostFile(usize);

/// A semihosting call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HostError;

impl HostFile {
    /// Opens `path` (which must end in a NUL byte) with an `nr::open` mode.
    pub(crate) fn open(path: &[u8], mode: usize) -> Result<Self, HostError> {
        let (Some(0), Some(len)) = (path.last().copied(), path.len().checked_sub(1)) else {
            return Err(HostError);
        };
        // SAFETY: SYS_OPEN reads `len` bytes of the NUL-terminated name at `path`, which is
        // borrowed for the whole call.
        let fd = unsafe { syscall!(OPEN, path.as_ptr(), mode, len) };
        if fd == usize::MAX {
            Err(HostError)
        } else {
            Ok(HostFile(fd))
        }
    }

    /// Reads up to `buf.len()` bytes; returns how many were read (0 at end of file).
    pub(crate) fn read(&mut self, buf: &mut [u8]) -> Result<usize, HostError> {
        // SAFETY: SYS_READ writes at most `buf.len()` bytes into `buf`, exclusively borrowed.
        let not_read = unsafe { syscall!(READ, self.0, buf.as_mut_ptr(), buf.len()) };
        buf.len().checked_sub(not_read).ok_or(HostError)
    }

    /// Reads exactly `buf.len()` bytes.
    pub(crate) fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), HostError> {
        let mut done = 0;
        while done < buf.len() {
            match self.read(&mut buf[done..])? {
                0 => return Err(HostError),
                n => done += n,
            }
        }
        Ok(())
    }

    /// Writes all of `buf`.
    pub(crate) fn write_all(&mut self, buf: &[u8]) -> Result<(), HostError> {
        // SAFETY: SYS_WRITE reads `buf.len()` bytes from `buf`, borrowed for the call.
        let not_written = unsafe { syscall!(WRITE, self.0, buf.as_ptr(), buf.len()) };
        if not_written == 0 {
            Ok(())
        } else {
            Err(HostError)
        }
    }

    /// Moves to byte `pos` from the start.
    pub(crate) fn seek(&mut self, pos: usize) -> Result<(), HostError> {
        // SAFETY: SYS_SEEK takes two integers; no memory is passed.
        match unsafe { syscall!(SEEK, self.0, pos) } {
            0 => Ok(()),
            _ => Err(HostError),
        }
    }

    /// The file's length in bytes.
    pub(crate) fn len(&mut self) -> Result<usize, HostError> {
        // SAFETY: SYS_FLEN takes one integer; no memory is passed.
        match unsafe { syscall!(FLEN, self.0) } {
            usize::MAX => Err(HostError),
            n => Ok(n),
        }
    }
}

impl Drop for HostFile {
    fn drop(&mut self) {
        // SAFETY: SYS_CLOSE takes one integer; the handle is not used again.
        let _ = unsafe { syscall!(CLOSE, self.0) };
    }
}

/// Open modes used by the firmware.
pub(crate) mod mode {
    use super::nr;
    /// Read, binary.
    pub(crate) const READ: usize = nr::open::R_BINARY;
    /// Read and write an existing file, binary.
    pub(crate) const READ_WRITE: usize = nr::open::RW_BINARY;
    /// Create or truncate, write, binary.
    pub(crate) const WRITE: usize = nr::open::W_TRUNC_BINARY;
}
