//! The NVMe driver against completion entries from the fuzzer: each 16-byte chunk is posted
//! by the emulated controller, as a made-up entry, before the completion of a real request
//! (read, write or flush, chosen by the first byte). Whatever the entries say (command ids
//! in use or not, garbage statuses, SQ heads and ids), the driver returns results or
//! errors, never panics or hangs, and never makes the controller touch memory outside its
//! DMA buffers.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use pcibus::nvme::spec::Completion;
use pcibus::nvme::{Controller, IoRequest, Options};
use pcibus::testing::nvme::{EmuConfig, EmulatedNvme, Fault, NamespaceConfig};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, entries)) = data.split_first() else {
        return;
    };
    let emu = EmulatedNvme::new(EmuConfig {
        namespaces: vec![NamespaceConfig::new(1024, 512)],
        ..EmuConfig::default()
    })
    .expect("emulator");
    let options = Options {
        admin_timeout: Duration::from_millis(500),
        io_timeout: Duration::from_millis(20),
        shadow_doorbells: mode & 0x80 != 0,
        ..Options::default()
    };
    let Ok(c) = Controller::init(emu.clone(), &options) else {
        return;
    };
    let Ok(mut q) = c.io_queue(8) else { return };
    let Ok(buf) = c.alloc_buffer(16 * 4096) else {
        return;
    };
    for (i, chunk) in entries.chunks_exact(16).take(32).enumerate() {
        let entry: [u8; 16] = chunk.try_into().expect("16 bytes");
        emu.inject(Fault::Forge(Completion::from_bytes(&entry)));
        let lba = u64::from(entry[0]) * 4;
        let req = match (mode as usize + i) % 3 {
            0 => IoRequest::read(1, lba, 8 + u64::from(entry[1] % 120), &buf, 0),
            1 => IoRequest::write(
                1,
                lba,
                1 + u64::from(entry[2] % 8),
                &buf,
                4 * usize::from(entry[3]),
            ),
            _ => IoRequest::flush(1),
        };
        if q.submit(&req, i as u64).is_err() {
            // Full (slots held by commands the entries made the driver give up on) or dead.
            let _ = q.poll(|_, _| {});
            continue;
        }
        let start = Instant::now();
        loop {
            if q.poll(|_, _| {}).is_err() || q.outstanding() == 0 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "a request neither ended nor timed out"
            );
        }
    }
    drop(q);
    assert_eq!(
        emu.stats().bad_dma,
        0,
        "the controller was pointed outside the driver's buffers"
    );
});
