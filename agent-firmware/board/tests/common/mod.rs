//! The NOR flash double shared by the power-cut tests: erase sets bytes to 0xFF,
//! programming only clears bits, and one chosen operation fails, either tearing it and
//! losing power (nothing works until the "reboot") or as a transient fault.
#![allow(dead_code, unreachable_pub)]

use embedded_storage::nor_flash::{
    ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
};

/// A small deterministic PRNG (xorshift64*), so failures reproduce from the printed seed.
#[derive(Clone)]
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashError {
    /// Power was cut during or before this operation.
    PowerCut,
    /// A transient fault: the operation did nothing, power stays on.
    Fault,
}

impl NorFlashError for FlashError {
    fn kind(&self) -> NorFlashErrorKind {
        NorFlashErrorKind::Other
    }
}

/// How the flash double misbehaves at its budgeted operation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Tear the operation and lose power: nothing works until the reboot.
    Cut,
    /// Fail the operation without effect; later ones work.
    Fault,
}

/// NOR flash in RAM: erase sets bytes to 0xFF, programming can only clear bits, and the
/// operation numbered `fail_at` (counting erases and writes from 0) fails as `failure` says.
pub struct CutFlash<const SECTOR: usize> {
    pub mem: Vec<u8>,
    pub ops: u64,
    pub fail_at: Option<u64>,
    pub failure: Failure,
    pub dead: bool,
    pub rng: Rng,
}

impl<const SECTOR: usize> CutFlash<SECTOR> {
    pub fn new(mem: Vec<u8>, fail_at: Option<u64>, failure: Failure, seed: u64) -> Self {
        CutFlash {
            mem,
            ops: 0,
            fail_at,
            failure,
            dead: false,
            rng: Rng(seed | 1),
        }
    }

    /// Counts one erase/write; says whether this one is torn.
    fn tick(&mut self) -> Result<bool, FlashError> {
        if self.dead {
            return Err(FlashError::PowerCut);
        }
        let n = self.ops;
        self.ops += 1;
        if self.fail_at == Some(n) {
            match self.failure {
                Failure::Cut => {
                    self.dead = true;
                    return Ok(true);
                }
                Failure::Fault => return Err(FlashError::Fault),
            }
        }
        Ok(false)
    }
}

impl<const SECTOR: usize> ErrorType for CutFlash<SECTOR> {
    type Error = FlashError;
}

impl<const SECTOR: usize> ReadNorFlash for CutFlash<SECTOR> {
    const READ_SIZE: usize = 1;
    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), FlashError> {
        if self.dead {
            return Err(FlashError::PowerCut);
        }
        let o = offset as usize;
        bytes.copy_from_slice(&self.mem[o..o + bytes.len()]);
        Ok(())
    }
    fn capacity(&self) -> usize {
        self.mem.len()
    }
}

impl<const SECTOR: usize> NorFlash for CutFlash<SECTOR> {
    const WRITE_SIZE: usize = 4;
    const ERASE_SIZE: usize = SECTOR;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), FlashError> {
        let (from, to) = (from as usize, to as usize);
        assert!(from % SECTOR == 0 && to % SECTOR == 0 && from < to && to <= self.mem.len());
        if self.tick()? {
            // Torn erase: a prefix is erased, a few bytes at the tear are noise, the rest
            // keeps its old contents.
            let k = from + self.rng.below((to - from + 1) as u64) as usize;
            self.mem[from..k].fill(0xFF);
            for b in self.mem[k..(k + 4).min(to)].iter_mut() {
                *b = self.rng.next() as u8;
            }
            return Err(FlashError::PowerCut);
        }
        self.mem[from..to].fill(0xFF);
        Ok(())
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), FlashError> {
        let o = offset as usize;
        assert!(o % 4 == 0 && bytes.len() % 4 == 0 && o + bytes.len() <= self.mem.len());
        // The store must only program erased bytes: NOR cannot set bits back.
        assert!(
            self.mem[o..o + bytes.len()].iter().all(|&b| b == 0xFF),
            "store programmed over unerased flash at {o}"
        );
        if self.tick()? {
            // Torn write: whole words before the tear, one word half-programmed.
            let words = bytes.len() / 4;
            let k = self.rng.below(words as u64 + 1) as usize;
            let target = &mut self.mem[o..o + bytes.len()];
            for (m, b) in target[..k * 4].iter_mut().zip(bytes) {
                *m &= b;
            }
            if k < words {
                for (m, b) in target[k * 4..k * 4 + 4].iter_mut().zip(&bytes[k * 4..]) {
                    let noise = self.rng.next() as u8;
                    *m &= b | noise;
                }
            }
            return Err(FlashError::PowerCut);
        }
        for (m, b) in self.mem[o..o + bytes.len()].iter_mut().zip(bytes) {
            *m &= b;
        }
        Ok(())
    }
}
