//! The QEMU board's NOR flash: a host file (`flash.bin`) with NOR rules, so the persisted
//! state survives across QEMU runs (a reboot is a new run over the same file).
//!
//! Erase sets bytes to 0xFF; a write can only clear bits (it is ANDed into what is there),
//! exactly as on NOR, so the store's logic is exercised as it would be on the chip.

use embedded_storage::nor_flash::{
    ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
};

use crate::semi::{HostError, HostFile};

/// Erase sector size (typical small-sector NOR).
pub(crate) const SECTOR: usize = 4096;
/// Bytes the flash file must have: two sectors, the A/B slots of the state store.
pub(crate) const CAPACITY: usize = 2 * SECTOR;
/// Bytes moved per semihosting call (a stack buffer).
const CHUNK: usize = 64;

/// NOR flash over a host file.
pub(crate) struct FileFlash {
    file: HostFile,
    /// Fail the next erase or write, without effect (the scenario's storage fault).
    pub(crate) fail_next: bool,
}

/// The host file failed, or an operation was out of range or misaligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FlashError {
    /// Semihosting failed.
    Host,
    /// An injected fault (see [`FileFlash::fail_next`]).
    Injected,
    /// Out of range or misaligned.
    Bounds,
}

impl From<HostError> for FlashError {
    fn from(_: HostError) -> Self {
        FlashError::Host
    }
}

impl NorFlashError for FlashError {
    fn kind(&self) -> NorFlashErrorKind {
        match self {
            FlashError::Host | FlashError::Injected => NorFlashErrorKind::Other,
            FlashError::Bounds => NorFlashErrorKind::OutOfBounds,
        }
    }
}

impl FileFlash {
    /// Uses `file`, which must be exactly [`CAPACITY`] bytes.
    pub(crate) fn new(mut file: HostFile) -> Result<Self, FlashError> {
        if file.len()? != CAPACITY {
            return Err(FlashError::Bounds);
        }
        Ok(FileFlash {
            file,
            fail_next: false,
        })
    }

    fn check(offset: u32, len: usize) -> Result<usize, FlashError> {
        let start = offset as usize;
        match start.checked_add(len) {
            Some(end) if end <= CAPACITY => Ok(start),
            _ => Err(FlashError::Bounds),
        }
    }
}

impl ErrorType for FileFlash {
    type Error = FlashError;
}

impl ReadNorFlash for FileFlash {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), FlashError> {
        let start = Self::check(offset, bytes.len())?;
        self.file.seek(start)?;
        self.file.read_exact(bytes)?;
        Ok(())
    }

    fn capacity(&self) -> usize {
        CAPACITY
    }
}

impl NorFlash for FileFlash {
    const WRITE_SIZE: usize = 4;
    const ERASE_SIZE: usize = SECTOR;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), FlashError> {
        if core::mem::take(&mut self.fail_next) {
            return Err(FlashError::Injected);
        }
        let start = Self::check(from, (to as usize).saturating_sub(from as usize))?;
        if from % SECTOR as u32 != 0 || to % SECTOR as u32 != 0 || to < from {
            return Err(FlashError::Bounds);
        }
        self.file.seek(start)?;
        let blank = [0xFFu8; CHUNK];
        for _ in 0..(to - from) as usize / CHUNK {
            self.file.write_all(&blank)?;
        }
        Ok(())
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), FlashError> {
        if core::mem::take(&mut self.fail_next) {
            return Err(FlashError::Injected);
        }
        let start = Self::check(offset, bytes.len())?;
        if start % Self::WRITE_SIZE != 0 || bytes.len() % Self::WRITE_SIZE != 0 {
            return Err(FlashError::Bounds);
        }
        let mut cell = [0u8; CHUNK];
        for (i, part) in bytes.chunks(CHUNK).enumerate() {
            let at = start + i * CHUNK;
            let cell = &mut cell[..part.len()];
            self.file.seek(at)?;
            self.file.read_exact(cell)?;
            for (c, b) in cell.iter_mut().zip(part) {
                *c &= b;
            }
            self.file.seek(at)?;
            self.file.write_all(cell)?;
        }
        Ok(())
    }
}
