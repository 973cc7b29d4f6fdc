//! The size report: section sizes from the ELF's section headers, the measured stack, and
//! the budget check.

use std::path::Path;

use object::{Object, ObjectSection};

use crate::{FLASH_BUDGET, RAM_BUDGET};

/// Sizes of the sections that occupy flash or RAM.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Sections {
    pub(crate) vector_table: u64,
    pub(crate) text: u64,
    pub(crate) rodata: u64,
    pub(crate) data: u64,
    pub(crate) bss: u64,
    pub(crate) uninit: u64,
}

impl Sections {
    /// Flash: the vector table, code, read-only data and `.data`'s initial values.
    pub(crate) fn flash(&self) -> u64 {
        self.vector_table + self.text + self.rodata + self.data
    }

    /// Static RAM: `.data`, `.bss` and `.uninit`.
    pub(crate) fn static_ram(&self) -> u64 {
        self.data + self.bss + self.uninit
    }
}

/// Reads the section headers of the firmware ELF.
pub(crate) fn sections(elf: &Path) -> Result<Sections, String> {
    let bytes = std::fs::read(elf).map_err(|e| format!("{}: {e}", elf.display()))?;
    let file =
        object::File::parse(&*bytes).map_err(|e| format!("{}: not an ELF: {e}", elf.display()))?;
    if file.architecture() != object::Architecture::Arm {
        return Err(format!("{}: not an Arm ELF", elf.display()));
    }
    let mut s = Sections::default();
    for section in file.sections() {
        let size = section.size();
        match section.name().unwrap_or("") {
            ".vector_table" => s.vector_table += size,
            ".text" => s.text += size,
            ".rodata" => s.rodata += size,
            ".data" => s.data += size,
            ".bss" => s.bss += size,
            ".uninit" => s.uninit += size,
            _ => {}
        }
    }
    if s.text == 0 {
        return Err(format!("{}: no .text section", elf.display()));
    }
    Ok(s)
}

/// The measured sizes against the budget.
pub(crate) struct Report {
    pub(crate) sizes: Sections,
    pub(crate) stack_high_water: u64,
    pub(crate) painted: u64,
}

impl Report {
    fn ram(&self) -> u64 {
        self.sizes.static_ram() + self.stack_high_water
    }

    /// Prints the size table.
    pub(crate) fn print(&self) {
        let s = &self.sizes;
        println!(
            "firmware size report (thumbv7em-none-eabihf, release: opt-level=z (Ed25519 crates s), lto, panic=abort)"
        );
        println!("  {:<34} {:>7} bytes", ".vector_table", s.vector_table);
        println!("  {:<34} {:>7} bytes", ".text", s.text);
        println!("  {:<34} {:>7} bytes", ".rodata", s.rodata);
        println!("  {:<34} {:>7} bytes", ".data", s.data);
        println!("  {:<34} {:>7} bytes", ".bss (+ .uninit)", s.bss + s.uninit);
        println!(
            "  {:<34} {:>7} bytes (painted region {} bytes)",
            "stack high-water (painted, QEMU)", self.stack_high_water, self.painted
        );
        println!(
            "  {:<34} {:>7} / {} bytes ({:.1}%) {}",
            "FLASH = vectors+text+rodata+data",
            s.flash(),
            FLASH_BUDGET,
            100.0 * s.flash() as f64 / FLASH_BUDGET as f64,
            verdict(s.flash() <= FLASH_BUDGET)
        );
        println!(
            "  {:<34} {:>7} / {} bytes ({:.1}%) {}",
            "RAM = data+bss+stack high-water",
            self.ram(),
            RAM_BUDGET,
            100.0 * self.ram() as f64 / RAM_BUDGET as f64,
            verdict(self.ram() <= RAM_BUDGET)
        );
    }

    /// Fails when a budget is exceeded or the stack measurement is implausible.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.stack_high_water == 0 || self.stack_high_water >= self.painted {
            return Err(format!(
                "stack measurement unusable: high-water {} of {} painted bytes",
                self.stack_high_water, self.painted
            ));
        }
        if self.sizes.flash() > FLASH_BUDGET {
            return Err(format!(
                "flash over budget: {} > {FLASH_BUDGET} bytes",
                self.sizes.flash()
            ));
        }
        if self.ram() > RAM_BUDGET {
            return Err(format!(
                "RAM over budget: {} > {RAM_BUDGET} bytes",
                self.ram()
            ));
        }
        Ok(())
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "OK"
    } else {
        "OVER BUDGET"
    }
}
