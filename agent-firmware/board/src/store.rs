//! A power-cut-safe store for one blob (the agent's persisted state) in NOR flash.
//!
//! Two slots (A and B), each a whole number of erase sectors. A save always goes to the
//! slot that does *not* hold the newest valid record, so the newest record is never erased
//! or overwritten while the new one is being written:
//!
//! ```text
//! slot offset   size  field
//! 0             4     magic "CaS1"
//! 4             8     generation (u64 LE): one more than the newest record when written
//! 12            4     payload length (u32 LE), at most `max_payload()`
//! 16            4     CRC-32 (IEEE) of bytes [0, 16) and of the payload
//! 20            n     payload, then 0xFF padding up to the write size
//! end - C       C     commit word "CoMt" (C = the write unit rounded up to 4 bytes)
//! ```
//!
//! A save is: erase the slot, write header and payload, then write the commit word. Only a
//! record whose magic, length, commit word and CRC all check is valid; on boot the valid
//! record with the highest generation wins. So a power cut at any point leaves either the
//! old record (the commit word is not there yet, or the erase/write was torn) or the new one
//! (the commit word is there, so everything before it was written), and the generation never
//! goes backwards. `save` returns `Ok` only after the commit word is written: anything
//! acknowledged is there after a reboot. The tests in `tests/power_cut.rs` cut power at every
//! write point, with torn writes and erases.
//!
//! Wear: every save erases one slot, i.e. each sector is erased every other save. An ECU
//! gets a handful of commands a day; 100,000-cycle NOR lasts centuries at that rate.

use embedded_storage::nor_flash::NorFlash;

use crate::crc::Crc32;

const MAGIC: [u8; 4] = *b"CaS1";
const COMMIT: [u8; 4] = *b"CoMt";
/// Bytes of the record header.
pub const HEADER_SIZE: usize = 20;
/// Bytes written through the staging buffer at a time; the flash's write size must divide it.
const CHUNK: usize = 32;

/// What went wrong in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError<E> {
    /// The flash driver failed (on a power cut, or a real fault).
    Flash(E),
    /// The payload is larger than a slot holds ([`SlotStore::max_payload`]).
    TooLarge,
    /// The caller's buffer is smaller than the stored payload.
    BufferTooSmall,
    /// The slot geometry does not fit the flash (see [`SlotStore::new`]).
    Geometry,
}

impl<E> From<E> for StoreError<E> {
    fn from(e: E) -> Self {
        StoreError::Flash(e)
    }
}

/// Which slot, and which generation, holds the newest valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Newest {
    slot: u32,
    generation: u64,
    len: u32,
}

/// The A/B slot store over a NOR flash region starting at `base`.
pub struct SlotStore<F> {
    flash: F,
    base: u32,
    slot_size: u32,
    newest: Option<Newest>,
}

impl<F: NorFlash> SlotStore<F> {
    /// A store using `[base, base + 2 * slot_size)` of `flash`. `base` and `slot_size` must be
    /// multiples of the erase size, the region must fit, the write size must divide 32 and
    /// reads must be byte-granular (`READ_SIZE == 1`, as on memory-mapped NOR).
    /// Scans both slots to find the newest valid record.
    pub fn new(flash: F, base: u32, slot_size: u32) -> Result<Self, StoreError<F::Error>> {
        let erase = F::ERASE_SIZE as u32;
        let geometry_ok = erase > 0
            && base % erase == 0
            && slot_size % erase == 0
            && slot_size as usize > HEADER_SIZE + CHUNK + commit_size::<F>()
            && CHUNK % F::WRITE_SIZE == 0
            && F::READ_SIZE == 1
            && (base as usize)
                .checked_add(2 * slot_size as usize)
                .is_some_and(|end| end <= flash.capacity());
        if !geometry_ok {
            return Err(StoreError::Geometry);
        }
        let mut store = SlotStore {
            flash,
            base,
            slot_size,
            newest: None,
        };
        store.newest = store.scan()?;
        Ok(store)
    }

    /// The largest payload a slot holds.
    pub fn max_payload(&self) -> usize {
        self.slot_size as usize - HEADER_SIZE - commit_size::<F>()
    }

    /// The generation of the newest valid record (0 when the store is empty).
    pub fn generation(&self) -> u64 {
        self.newest.map_or(0, |n| n.generation)
    }

    /// Copies the newest valid payload into `buf` and returns its length, or `None` when no
    /// record was ever committed.
    pub fn load(&mut self, buf: &mut [u8]) -> Result<Option<usize>, StoreError<F::Error>> {
        let Some(newest) = self.newest else {
            return Ok(None);
        };
        let len = newest.len as usize;
        let dst = buf.get_mut(..len).ok_or(StoreError::BufferTooSmall)?;
        self.flash
            .read(self.slot_offset(newest.slot) + HEADER_SIZE as u32, dst)?;
        Ok(Some(len))
    }

    /// Saves `payload` as the newest record. On `Ok` it is committed; on `Err` the previous
    /// record is still the newest (unless power was cut after the commit word, in which case
    /// the new one is: both are acceptable, the caller did not acknowledge it).
    pub fn save(&mut self, payload: &[u8]) -> Result<(), StoreError<F::Error>> {
        if payload.len() > self.max_payload() {
            return Err(StoreError::TooLarge);
        }
        let slot = match self.newest {
            Some(n) => 1 - n.slot,
            None => 0,
        };
        let generation = self.generation().wrapping_add(1);
        let start = self.slot_offset(slot);
        self.flash.erase(start, start + self.slot_size)?;

        let len = payload.len() as u32;
        let mut header = [0u8; HEADER_SIZE];
        header[..4].copy_from_slice(&MAGIC);
        header[4..12].copy_from_slice(&generation.to_le_bytes());
        header[12..16].copy_from_slice(&len.to_le_bytes());
        let mut crc = Crc32::new();
        crc.update(&header[..16]);
        crc.update(payload);
        header[16..20].copy_from_slice(&crc.finish().to_le_bytes());

        let mut writer = ChunkWriter {
            buf: [0xFF; CHUNK],
            fill: 0,
            offset: start,
        };
        writer.push(&mut self.flash, &header)?;
        writer.push(&mut self.flash, payload)?;
        writer.flush::<F>(&mut self.flash)?;

        let mut commit = [0xFFu8; CHUNK];
        let csize = commit_size::<F>();
        commit[..4].copy_from_slice(&COMMIT);
        self.flash
            .write(start + self.slot_size - csize as u32, &commit[..csize])?;

        self.newest = Some(Newest {
            slot,
            generation,
            len,
        });
        Ok(())
    }

    /// The flash, e.g. for a board to inject a fault in a test.
    pub fn flash_mut(&mut self) -> &mut F {
        &mut self.flash
    }

    /// Gives the flash back (tests use it to "reboot" with the same contents).
    pub fn into_flash(self) -> F {
        self.flash
    }

    fn slot_offset(&self, slot: u32) -> u32 {
        self.base + slot * self.slot_size
    }

    fn scan(&mut self) -> Result<Option<Newest>, StoreError<F::Error>> {
        let mut best: Option<Newest> = None;
        for slot in 0..2 {
            if let Some(found) = self.check_slot(slot)? {
                if best.is_none_or(|b| found.generation > b.generation) {
                    best = Some(found);
                }
            }
        }
        Ok(best)
    }

    /// The record in `slot` if it is whole: magic, length, commit word and CRC all check.
    fn check_slot(&mut self, slot: u32) -> Result<Option<Newest>, StoreError<F::Error>> {
        let start = self.slot_offset(slot);
        let mut header = [0u8; HEADER_SIZE];
        self.flash.read(start, &mut header)?;
        if header[..4] != MAGIC {
            return Ok(None);
        }
        let len = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
        if len as usize > self.max_payload() {
            return Ok(None);
        }
        let mut commit = [0u8; 4];
        self.flash.read(
            start + self.slot_size - commit_size::<F>() as u32,
            &mut commit,
        )?;
        if commit != COMMIT {
            return Ok(None);
        }
        let mut crc = Crc32::new();
        crc.update(&header[..16]);
        let mut chunk = [0u8; CHUNK];
        let mut done = 0u32;
        while done < len {
            let n = (len - done).min(CHUNK as u32);
            self.flash
                .read(start + HEADER_SIZE as u32 + done, &mut chunk[..n as usize])?;
            crc.update(&chunk[..n as usize]);
            done += n;
        }
        let stored = u32::from_le_bytes([header[16], header[17], header[18], header[19]]);
        if crc.finish() != stored {
            return Ok(None);
        }
        let generation = u64::from_le_bytes([
            header[4], header[5], header[6], header[7], header[8], header[9], header[10],
            header[11],
        ]);
        Ok(Some(Newest {
            slot,
            generation,
            len,
        }))
    }
}

/// The commit word's size: 4 bytes rounded up to the flash's write unit.
fn commit_size<F: NorFlash>() -> usize {
    4usize.next_multiple_of(F::WRITE_SIZE)
}

/// Streams bytes to flash in `CHUNK`-byte writes; the tail is padded with 0xFF to the
/// flash's write size.
struct ChunkWriter {
    buf: [u8; CHUNK],
    fill: usize,
    offset: u32,
}

impl ChunkWriter {
    fn push<F: NorFlash>(&mut self, flash: &mut F, mut data: &[u8]) -> Result<(), F::Error> {
        while !data.is_empty() {
            let n = (CHUNK - self.fill).min(data.len());
            self.buf[self.fill..self.fill + n].copy_from_slice(&data[..n]);
            self.fill += n;
            data = &data[n..];
            if self.fill == CHUNK {
                flash.write(self.offset, &self.buf)?;
                self.offset += CHUNK as u32;
                self.fill = 0;
            }
        }
        Ok(())
    }

    fn flush<F: NorFlash>(&mut self, flash: &mut F) -> Result<(), F::Error> {
        if self.fill > 0 {
            let padded = self.fill.next_multiple_of(F::WRITE_SIZE);
            self.buf[self.fill..padded].fill(0xFF);
            flash.write(self.offset, &self.buf[..padded])?;
            self.offset += padded as u32;
            self.fill = 0;
        }
        Ok(())
    }
}
