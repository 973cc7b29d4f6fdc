//! Runs the firmware in QEMU (bounded in time) and reads back its output records.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use caas_firmware_board::transport::{OutKind, OUT_HEADER_SIZE};

/// How to start QEMU.
pub(crate) struct Qemu {
    pub(crate) binary: String,
    pub(crate) elf: PathBuf,
    pub(crate) timeout: Duration,
}

/// One output record.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub(crate) kind: OutKind,
    pub(crate) body: Vec<u8>,
}

impl Qemu {
    /// Runs the firmware with `dir` as QEMU's working directory (where the semihosting
    /// files are) and returns its exit status and its console output.
    pub(crate) fn run(&self, dir: &Path) -> Result<(i32, String), String> {
        let elf =
            std::fs::canonicalize(&self.elf).map_err(|e| format!("{}: {e}", self.elf.display()))?;
        let mut child = Command::new(&self.binary)
            .args([
                "-machine",
                "mps2-an386",
                "-cpu",
                "cortex-m4",
                "-nographic",
                "-monitor",
                "none",
            ])
            .args([
                "-serial",
                "none",
                "-semihosting-config",
                "enable=on,target=native",
            ])
            // One instruction = 1 ns of virtual time: SysTick then counts instructions.
            .args(["-icount", "shift=0"])
            .arg("-kernel")
            .arg(&elf)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start {} (scripts/install-deps.sh installs it): {e}",
                    self.binary
                )
            })?;
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                break status;
            }
            if start.elapsed() > self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("QEMU did not finish within {:?}", self.timeout));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut console = String::new();
        if let Some(mut out) = child.stdout.take() {
            let _ = out.read_to_string(&mut console);
        }
        if let Some(mut err) = child.stderr.take() {
            let _ = err.read_to_string(&mut console);
        }
        Ok((status.code().unwrap_or(-1), console))
    }
}

/// Parses `out.bin`.
pub(crate) fn read_records(path: &Path) -> Result<Vec<Record>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut records = Vec::new();
    let mut rest = bytes.as_slice();
    while !rest.is_empty() {
        if rest.len() < OUT_HEADER_SIZE {
            return Err("out.bin ends inside a record header".into());
        }
        let kind = OutKind::from_u8(rest[0])
            .ok_or_else(|| format!("out.bin: unknown record tag {}", rest[0]))?;
        let len = usize::from(u16::from_le_bytes([rest[1], rest[2]]));
        let body = rest
            .get(OUT_HEADER_SIZE..OUT_HEADER_SIZE + len)
            .ok_or("out.bin ends inside a record body")?;
        records.push(Record {
            kind,
            body: body.to_vec(),
        });
        rest = &rest[OUT_HEADER_SIZE + len..];
    }
    Ok(records)
}
