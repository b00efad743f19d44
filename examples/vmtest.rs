//! `pcibus-vmtest`: the guest side of the VM tests (tests/vm/guest/*.sh). Each subcommand
//! checks one claim of pcibus against a real kernel, prints what it measured, and exits 1
//! with the reasons when the claim does not hold.
//!
//! ```text
//! pcibus-vmtest list-json            pcibus list --json agrees with the sysfs files
//! pcibus-vmtest vfio-open ADDR       open through VFIO: BAR0, config space, regions, reset
//! pcibus-vmtest vfio-dma ADDR        map DMA buffers in the IOMMU; an NVMe Identify by DMA
//! pcibus-vmtest hold ADDR SECONDS    keep ADDR open through VFIO, ignoring removal requests
//! pcibus-vmtest seed ADDR            the same-process removal: REQ, registry, scans
//! ```
//!
//! Built statically by tests/vm/run and installed in the guest as /usr/bin/pcibus-vmtest;
//! it runs the `pcibus` binary it checks from $PATH (or $PCIBUS_BIN).

#[cfg(feature = "cli")]
fn main() -> std::process::ExitCode {
    vmtest::main()
}

#[cfg(not(feature = "cli"))]
fn main() {
    eprintln!("pcibus-vmtest needs the `cli` feature (serde_json, the pcibus binary)");
    std::process::exit(2);
}

#[cfg(feature = "cli")]
mod vmtest {
    use std::collections::BTreeSet;
    use std::os::fd::{AsFd, BorrowedFd};
    use std::path::Path;
    use std::process::{Command, ExitCode};
    use std::sync::Arc;
    use std::sync::atomic::{Ordering, fence};
    use std::thread;
    use std::time::{Duration, Instant};

    use nix::sys::eventfd::{EfdFlags, EventFd};
    use serde_json::Value;

    use pcibus::vfio::{DmaBuffer, DmaMapping, VfioDevice, irq, region_flags};
    use pcibus::{BlockingAttr, PciAddress, ProblemKind, RemovalRegistry, Scanner, SysfsRoot};

    type Res<T = ()> = Result<T, String>;

    const SYS: &str = "/sys";

    pub fn main() -> ExitCode {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let result = match args.as_slice() {
            ["list-json"] => list_json(),
            ["vfio-open", addr] => addr.parse().map_err(err).and_then(vfio_open),
            ["vfio-dma", addr] => addr.parse().map_err(err).and_then(vfio_dma),
            ["hold", addr, secs] => addr
                .parse()
                .map_err(err)
                .and_then(|a| hold(a, secs.parse().map_err(err)?)),
            ["seed", addr] => addr.parse().map_err(err).and_then(seed),
            _ => Err(
                "usage: pcibus-vmtest list-json | vfio-open ADDR | vfio-dma ADDR | \
                      hold ADDR SECONDS | seed ADDR"
                    .into(),
            ),
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("FAIL: {e}");
                ExitCode::FAILURE
            }
        }
    }

    fn err(e: impl std::fmt::Display) -> String {
        e.to_string()
    }

    fn ms(d: Duration) -> String {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    }

    /// Collects failed checks so one run reports all of them.
    #[derive(Default)]
    struct Checks(Vec<String>);

    impl Checks {
        fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
            if !ok {
                let what = what();
                eprintln!("  mismatch: {what}");
                self.0.push(what);
            }
        }
        fn done(self, what: &str) -> Res {
            if self.0.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{what}: {} check(s) failed: {}",
                    self.0.len(),
                    self.0.join("; ")
                ))
            }
        }
    }

    fn pcibus_bin() -> String {
        std::env::var("PCIBUS_BIN").unwrap_or_else(|_| "pcibus".into())
    }

    /// Runs the pcibus CLI; returns stdout (it must exit 0) and how long it took.
    fn run_pcibus(args: &[&str]) -> Res<(String, Duration)> {
        let t = Instant::now();
        let out = Command::new(pcibus_bin())
            .args(args)
            .output()
            .map_err(|e| format!("run pcibus {}: {e}", args.join(" ")))?;
        let took = t.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !stderr.trim().is_empty() {
            eprintln!("  pcibus {} stderr: {}", args.join(" "), stderr.trim());
        }
        if !out.status.success() {
            return Err(format!("pcibus {} exited with {}", args.join(" "), out.status));
        }
        Ok((String::from_utf8_lossy(&out.stdout).into_owned(), took))
    }

    // ------------------------------------------------------------------ list-json

    fn read_trim(path: &Path) -> Option<String> {
        std::fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
    }

    fn hex_file(dir: &Path, name: &str) -> Option<u64> {
        let s = read_trim(&dir.join(name))?;
        u64::from_str_radix(s.trim_start_matches("0x"), 16).ok()
    }

    fn link_base(dir: &Path, name: &str) -> Option<String> {
        std::fs::read_link(dir.join(name))
            .ok()
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
    }

    /// What the sysfs files say about one device, as the JSON pcibus should print.
    fn expected_from_files(dir: &Path) -> Vec<(&'static str, Value)> {
        let num = |v: Option<u64>| v.map_or(Value::Null, Value::from);
        let numa = read_trim(&dir.join("numa_node")).and_then(|s| s.parse::<i64>().ok());
        vec![
            ("vendor", num(hex_file(dir, "vendor"))),
            ("device", num(hex_file(dir, "device"))),
            ("subsystem_vendor", num(hex_file(dir, "subsystem_vendor"))),
            ("subsystem_device", num(hex_file(dir, "subsystem_device"))),
            ("class", num(hex_file(dir, "class"))),
            ("revision", num(hex_file(dir, "revision"))),
            // -1 means no NUMA affinity: null.
            (
                "numa_node",
                numa.filter(|n| *n >= 0).map_or(Value::Null, Value::from),
            ),
            (
                "driver",
                link_base(dir, "driver").map_or(Value::Null, Value::from),
            ),
            (
                "iommu_group",
                link_base(dir, "iommu_group")
                    .and_then(|g| g.parse::<u64>().ok())
                    .map_or(Value::Null, Value::from),
            ),
            (
                "physfn",
                link_base(dir, "physfn").map_or(Value::Null, Value::from),
            ),
        ]
    }

    fn list_json() -> Res {
        let devices_dir = Path::new(SYS).join("bus/pci/devices");
        let mut in_sysfs: Vec<String> = std::fs::read_dir(&devices_dir)
            .map_err(err)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        in_sysfs.sort();
        let mut checks = Checks::default();
        for extra in [&[][..], &["--id-files"][..]] {
            let mut args = vec!["list", "--json"];
            args.extend_from_slice(extra);
            let (out, took) = run_pcibus(&args)?;
            let lines = out.lines().count();
            let list: Value = serde_json::from_str(&out).map_err(|e| format!("pcibus list --json: {e}"))?;
            let list = list.as_array().ok_or("pcibus list --json: not an array")?;
            println!(
                "pcibus {}: {} devices in {} ({} lines)",
                args.join(" "),
                list.len(),
                ms(took),
                lines
            );
            // One object per line between the brackets, so shell tests can grep it.
            checks.check(lines == list.len() + 2 || list.is_empty(), || {
                format!(
                    "{lines} lines for {} devices: not one object per line",
                    list.len()
                )
            });
            let listed: Vec<String> = list
                .iter()
                .map(|d| d["address"].as_str().unwrap_or("?").to_owned())
                .collect();
            checks.check(listed == in_sysfs, || {
                format!("addresses {listed:?} differ from sysfs {in_sysfs:?}")
            });
            for d in list {
                let addr = d["address"].as_str().unwrap_or("?");
                let dir = devices_dir.join(addr);
                let mut summary = Vec::new();
                for (key, want) in expected_from_files(&dir) {
                    let got = &d[key];
                    checks.check(*got == want, || {
                        format!("{addr} {key}: pcibus says {got}, sysfs says {want}")
                    });
                    if !want.is_null() {
                        summary.push(match (key, want.as_u64()) {
                            ("vendor" | "device" | "subsystem_vendor" | "subsystem_device", Some(v)) => {
                                format!("{key}={v:04x}")
                            }
                            ("class", Some(v)) => format!("{key}={v:06x}"),
                            _ => format!("{key}={want}"),
                        });
                    }
                }
                if let Some(total) = read_trim(&dir.join("sriov_totalvfs")) {
                    let got = &d["sriov"]["total_vfs"];
                    checks.check(got.as_u64().map(|v| v.to_string()) == Some(total.clone()), || {
                        format!("{addr} sriov.total_vfs: pcibus says {got}, sysfs says {total}")
                    });
                    summary.push(format!("total_vfs={total}"));
                }
                let problems = &d["problems"];
                checks.check(problems.as_array().is_some_and(|p| p.is_empty()), || {
                    format!("{addr} has problems {problems}")
                });
                if extra.is_empty() {
                    println!("  {addr} {}", summary.join(" "));
                }
            }
        }
        checks.done("list-json")
    }

    // ------------------------------------------------------------------ vfio-open

    fn region_flag_names(flags: u32) -> Vec<&'static str> {
        [
            (region_flags::READ, "read"),
            (region_flags::WRITE, "write"),
            (region_flags::MMAP, "mmap"),
            (region_flags::CAPS, "caps"),
        ]
        .into_iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, n)| n)
        .collect()
    }

    fn vfio_open(addr: PciAddress) -> Res {
        let root = SysfsRoot::new(SYS);
        let dir = root.device_dir(addr);
        let mut checks = Checks::default();

        // `pcibus vfio info` first: a group can be open in one place only.
        let (out, took) = run_pcibus(&["vfio", "info", &addr.to_string(), "--json"])?;
        let info: Value = serde_json::from_str(&out).map_err(|e| format!("vfio info --json: {e}"))?;
        println!("pcibus vfio info {addr} --json: {}", ms(took));

        let t = Instant::now();
        let dev = VfioDevice::open(&root, addr).map_err(|e| format!("VfioDevice::open: {e}"))?;
        println!(
            "opened {addr} in {}: group {}, {} regions, {} irq indexes",
            ms(t.elapsed()),
            dev.group().number(),
            dev.num_regions(),
            dev.num_irqs()
        );
        checks.check(
            info["group"].as_u64() == Some(dev.group().number().into()),
            || format!("vfio info group {} vs {}", info["group"], dev.group().number()),
        );
        checks.check(info["viable"] == Value::Bool(true), || {
            "vfio info: not viable".into()
        });

        // Regions and IRQs as `pcibus vfio info` printed them.
        let regions = info["regions"].as_array().cloned().unwrap_or_default();
        let mut described = 0;
        for index in 0..dev.num_regions() {
            let j = regions.iter().find(|j| j["index"].as_u64() == Some(index.into()));
            // vfio-pci refuses the info of some indexes (VGA on a device that is not VGA):
            // `vfio info` leaves those out.
            let r = match dev.region(index) {
                Ok(r) => r,
                Err(e) => {
                    let cause = std::error::Error::source(&e)
                        .map(|s| s.to_string())
                        .unwrap_or_default();
                    println!(
                        "  region {index}: {e} ({cause}); vfio info lists it: {}",
                        j.is_some()
                    );
                    checks.check(j.is_none(), || {
                        format!("vfio info lists region {index}, which has no info")
                    });
                    continue;
                }
            };
            described += 1;
            let Some(j) = j else {
                checks.check(false, || format!("region {index} missing from vfio info"));
                continue;
            };
            let flags: Vec<&str> = j["flags"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let areas: Vec<(u64, u64)> = j["mmap_areas"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| (a["offset"].as_u64().unwrap_or(0), a["size"].as_u64().unwrap_or(0)))
                .collect();
            checks.check(
                j["size"].as_u64() == Some(r.size)
                    && j["offset"].as_u64() == Some(r.offset)
                    && flags == region_flag_names(r.flags)
                    && areas == r.mmap_areas()
                    && j["msix_mappable"].as_bool() == Some(r.msix_mappable),
                || format!("region {index}: vfio info {j} vs {r:?}"),
            );
            if r.size > 0 {
                println!(
                    "  region {index}: size {:#x} flags {} mmap {:x?}{}",
                    r.size,
                    region_flag_names(r.flags).join(","),
                    r.mmap_areas(),
                    if r.msix_mappable { " msix-mappable" } else { "" }
                );
            }
        }
        checks.check(regions.len() == described, || {
            format!("vfio info lists {} regions, {described} have info", regions.len())
        });
        let irqs = info["irqs"].as_array().cloned().unwrap_or_default();
        checks.check(irqs.len() == dev.num_irqs() as usize, || {
            format!(
                "vfio info lists {} irq indexes, the device has {}",
                irqs.len(),
                dev.num_irqs()
            )
        });
        for index in 0..dev.num_irqs() {
            let i = dev.irq_info(index).map_err(err)?;
            let j = irqs.iter().find(|j| j["index"].as_u64() == Some(index.into()));
            checks.check(
                j.is_some_and(|j| {
                    j["count"].as_u64() == Some(i.count.into()) && j["flags"].as_u64() == Some(i.flags.into())
                }),
                || format!("irq {index}: vfio info {j:?} vs {i:?}"),
            );
            println!(
                "  irq {index} {}: count {} flags {:#x}",
                irq::NAMES.get(index as usize).unwrap_or(&"?"),
                i.count,
                i.flags
            );
        }
        let req = dev.irq_info(irq::REQ).map_err(err)?;
        checks.check(req.count == 1, || format!("REQ irq count {}", req.count));

        // BAR0: NVMe registers.
        let bar0 = dev.map_bar(0).map_err(|e| format!("map BAR0: {e}"))?;
        println!("  BAR0 mapped areas {:x?}", bar0.mapped());
        checks.check(bar0.mapped().iter().any(|&(o, s)| o == 0 && s >= 0x1000), || {
            "BAR0 registers (0..0x1000) are not mmapped".into()
        });
        let (cap, vs) = nvme_cap_vs(&bar0, &mut checks)?;

        // Config space through VFIO against sysfs `config`.
        let vcfg = dev.config().map_err(err)?;
        let scfg = std::fs::read(dir.join("config")).map_err(err)?;
        println!(
            "  config: {} bytes through VFIO, {} from sysfs",
            vcfg.len(),
            scfg.len()
        );
        checks.check(vcfg.len() >= 64 && scfg.len() >= 64, || {
            "config shorter than 64 bytes".into()
        });
        let n = vcfg.len().min(scfg.len()).min(256);
        let differ: Vec<usize> = (0..n).filter(|&i| vcfg[i] != scfg[i]).collect();
        let describe = |i: usize| format!("{i:#04x}: vfio {:02x} sysfs {:02x}", vcfg[i], scfg[i]);
        println!(
            "  config bytes that differ in the first {n}: {}",
            if differ.is_empty() {
                "none".to_owned()
            } else {
                differ.iter().map(|&i| describe(i)).collect::<Vec<_>>().join(", ")
            }
        );
        // Ids, revision, class, header type, subsystem ids, capability pointer: never
        // virtualized differently.
        let must_match = (0x00..0x04)
            .chain(0x08..0x0c)
            .chain([0x0e])
            .chain(0x2c..0x30)
            .chain([0x34]);
        for i in must_match {
            checks.check(vcfg[i] == scfg[i], || format!("config {}", describe(i)));
        }
        let vcaps = pcibus::config::capabilities(&vcfg).map_err(err)?;
        let scaps = pcibus::config::capabilities(&scfg).map_err(err)?;
        let names = |c: &[pcibus::config::Capability]| {
            c.iter()
                .map(|c| format!("{}@{:#x}", pcibus::config::capability_name(c.id), c.offset))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!("  capabilities via VFIO: {}", names(&vcaps));
        if vcaps != scaps {
            println!("  capabilities via sysfs: {}", names(&scaps));
        }

        // Reset: the controller comes back disabled with the same CAP and VS.
        let methods = read_trim(&dir.join("reset_method")).unwrap_or_else(|| "?".into());
        let t = Instant::now();
        dev.reset()
            .map_err(|e| format!("reset (reset_method: {methods}): {e}"))?;
        let took = t.elapsed();
        let cc = bar0.read32(0x14).map_err(err)?;
        let csts = bar0.read32(0x1c).map_err(err)?;
        let cap2 = bar0.read64(0).map_err(err)?;
        let vs2 = bar0.read32(8).map_err(err)?;
        println!(
            "  VFIO_DEVICE_RESET in {} (reset_method: {methods}); after it CC {cc:#x} CSTS {csts:#x}",
            ms(took)
        );
        checks.check(cap2 == cap && vs2 == vs, || {
            format!("after reset CAP {cap2:#x} VS {vs2:#x}, before {cap:#x} {vs:#x}")
        });
        checks.check(cc & 1 == 0 && csts & 1 == 0, || {
            format!("after reset CC.EN/CSTS.RDY not clear: CC {cc:#x} CSTS {csts:#x}")
        });
        let vendor = u16::from_le_bytes([vcfg[0], vcfg[1]]);
        let mut id = [0u8; 2];
        dev.read_config(0, &mut id).map_err(err)?;
        checks.check(u16::from_le_bytes(id) == vendor, || {
            "vendor id changed after reset".into()
        });
        drop(bar0);
        let t = Instant::now();
        drop(dev);
        println!("  closed in {}", ms(t.elapsed()));
        checks.done("vfio-open")
    }

    /// Reads and checks NVMe CAP and VS; returns them.
    fn nvme_cap_vs(bar0: &pcibus::vfio::Bar<'_>, checks: &mut Checks) -> Res<(u64, u32)> {
        let cap = bar0.read64(0).map_err(err)?;
        let vs = bar0.read32(8).map_err(err)?;
        let mqes = cap & 0xffff;
        let to = (cap >> 24) & 0xff;
        let dstrd = (cap >> 32) & 0xf;
        let css = (cap >> 37) & 0xff;
        let mpsmin = (cap >> 48) & 0xf;
        let (major, minor, tertiary) = (vs >> 16, (vs >> 8) & 0xff, vs & 0xff);
        println!(
            "  CAP {cap:#018x}: MQES+1 {} TO {} ms DSTRD {dstrd} (doorbell stride {}) CSS {css:#x} MPSMIN {}",
            mqes + 1,
            to * 500,
            4u64 << dstrd,
            4096u64 << mpsmin
        );
        println!("  VS {vs:#010x}: NVMe {major}.{minor}.{tertiary}");
        checks.check(mqes + 1 >= 2, || format!("CAP.MQES+1 = {}", mqes + 1));
        checks.check(dstrd <= 4, || format!("CAP.DSTRD = {dstrd}"));
        checks.check(css & 1 == 1, || {
            format!("CAP.CSS {css:#x} lacks the NVM command set")
        });
        checks.check(to > 0, || "CAP.TO = 0".into());
        checks.check((major, minor) >= (1, 2), || format!("VS {vs:#x} below 1.2"));
        if vs != 0x0001_0400 {
            println!("  note: VS is not QEMU's usual 1.4.0");
        }
        Ok((cap, vs))
    }

    // ------------------------------------------------------------------- vfio-dma

    fn vfio_dma(addr: PciAddress) -> Res {
        let root = SysfsRoot::new(SYS);
        let mut checks = Checks::default();
        let dev = VfioDevice::open(&root, addr).map_err(|e| format!("VfioDevice::open: {e}"))?;
        let container = Arc::clone(dev.container());
        let info = container
            .iommu_info()
            .ok_or("no IOMMU info after attaching the group")?;
        println!(
            "IOMMU page sizes {:#x} (smallest {:#x}); IOVA ranges:",
            info.page_sizes,
            info.min_page_size()
        );
        for r in &info.iova_ranges {
            println!("  {:#014x}..={:#014x}", r.start(), r.end());
        }
        checks.check(!info.iova_ranges.is_empty(), || {
            "the kernel reported no IOVA ranges".into()
        });
        let top = info.iova_ranges.iter().map(|r| *r.end()).max().unwrap_or(0);
        // QEMU's intel-iommu has 39-bit IOVAs (aw-bits=39 by default in 7.2).
        checks.check(top == (1u64 << 39) - 1, || {
            format!("highest IOVA {top:#x}, expected 2^39-1")
        });
        let inside = |iova: u64, size: u64| {
            info.iova_ranges
                .iter()
                .any(|r| r.contains(&iova) && r.contains(&(iova + size - 1)))
        };

        // A few buffers of different sizes: IOVAs inside the ranges, aligned, disjoint.
        let mut maps = Vec::new();
        for len in [4096usize, 64 << 10, 2 << 20] {
            let buf = DmaBuffer::new(len).map_err(|e| format!("DmaBuffer::new({len}): {e}"))?;
            let t = Instant::now();
            let m = container.map(&buf).map_err(|e| format!("map {len} bytes: {e}"))?;
            println!(
                "  mapped {len:#x} bytes ({}) at IOVA {:#x} in {}",
                if buf.is_huge() {
                    "huge pages"
                } else {
                    "4 KiB pages"
                },
                m.iova,
                ms(t.elapsed())
            );
            checks.check(inside(m.iova, m.size), || {
                format!("IOVA {:#x}+{:#x} outside the ranges", m.iova, m.size)
            });
            checks.check(m.iova % info.min_page_size() == 0, || {
                format!("IOVA {:#x} misaligned", m.iova)
            });
            checks.check(m.size >= len as u64, || {
                format!("mapped {} bytes of {len}", m.size)
            });
            for (_, other) in &maps {
                let other: &DmaMapping = other;
                checks.check(
                    m.iova + m.size <= other.iova || other.iova + other.size <= m.iova,
                    || format!("IOVA {:#x} overlaps {:#x}", m.iova, other.iova),
                );
            }
            maps.push((buf, m));
        }

        // The device really reaches the buffers at those IOVAs: an NVMe Identify Controller.
        if let Err(e) = nvme_identify(&dev, &maps) {
            checks.check(false, || format!("NVMe Identify by DMA: {e}"));
        }

        for (buf, m) in maps {
            let t = Instant::now();
            container
                .unmap(m)
                .map_err(|e| format!("unmap IOVA {:#x}: {e}", m.iova))?;
            println!("  unmapped IOVA {:#x} in {}", m.iova, ms(t.elapsed()));
            drop(buf);
        }
        // Unmapped space is handed out again.
        let buf = DmaBuffer::new(4096).map_err(err)?;
        let m = container.map(&buf).map_err(err)?;
        println!("  remapped 4 KiB at IOVA {:#x}", m.iova);
        checks.check(inside(m.iova, m.size), || {
            format!("IOVA {:#x} outside the ranges", m.iova)
        });
        container.unmap(m).map_err(err)?;
        checks.done("vfio-dma")
    }

    fn wait_bit(
        bar: &pcibus::vfio::Bar<'_>,
        off: u64,
        mask: u32,
        want: u32,
        timeout: Duration,
    ) -> Res<Duration> {
        let t = Instant::now();
        loop {
            let v = bar.read32(off).map_err(err)?;
            if v & mask == want {
                return Ok(t.elapsed());
            }
            if t.elapsed() > timeout {
                return Err(format!(
                    "register {off:#x} = {v:#x}: bits {mask:#x} not {want:#x} after {}",
                    ms(timeout)
                ));
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Brings up the admin queue (SQ in the first buffer, CQ in the second) and reads
    /// Identify Controller into the third, all by DMA through their IOVAs; then disables
    /// the controller. Every MSI-X vector is routed to an eventfd in one call beforehand,
    /// and the admin completion (interrupt vector 0) must signal the first one.
    fn nvme_identify(dev: &VfioDevice, bufs: &[(DmaBuffer, DmaMapping)]) -> Res {
        let [(sq, sqm), (cq, cqm), (data, datam)] = bufs else {
            return Err("need three buffers".into());
        };
        let (sq_iova, cq_iova, data_iova) = (sqm.iova, cqm.iova, datam.iova);
        // Memory space and bus master on.
        let mut cmd = [0u8; 2];
        dev.read_config(4, &mut cmd).map_err(err)?;
        let cmd = u16::from_le_bytes(cmd) | 0x6;
        dev.write_config(4, &cmd.to_le_bytes()).map_err(err)?;
        let bar = dev.map_bar(0).map_err(err)?;
        let cap = bar.read64(0).map_err(err)?;
        let timeout = Duration::from_millis(500 * ((cap >> 24) & 0xff).max(1));
        let stride = 4u64 << ((cap >> 32) & 0xf);
        bar.write32(0x14, 0).map_err(err)?;
        wait_bit(&bar, 0x1c, 1, 0, timeout)?;
        sq.zero();
        cq.zero();
        data.zero();
        const DEPTH: u32 = 8;
        bar.write32(0x24, ((DEPTH - 1) << 16) | (DEPTH - 1))
            .map_err(err)?;
        for (off, iova) in [(0x28, sq_iova), (0x30, cq_iova)] {
            bar.write32(off, iova as u32).map_err(err)?;
            bar.write32(off + 4, (iova >> 32) as u32).map_err(err)?;
        }
        // All MSI-X vectors in one call (6.1 cannot grow MSI-X once it is enabled).
        let msix = dev.irq_info(irq::MSIX).map_err(err)?;
        let efds: Vec<EventFd> = (0..msix.count)
            .map(|_| EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK))
            .collect::<Result<_, _>>()
            .map_err(err)?;
        let fds: Vec<BorrowedFd<'_>> = efds.iter().map(|e| e.as_fd()).collect();
        dev.enable_msix(&fds).map_err(err)?;
        // The error index: register an eventfd and take it back, where the device has one.
        let err_irq = dev.irq_info(irq::ERR).map_err(err)?;
        if err_irq.count > 0 {
            let e = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC).map_err(err)?;
            dev.set_irq_eventfds(irq::ERR, &[e.as_fd()]).map_err(err)?;
            dev.disable_irq(irq::ERR).map_err(err)?;
        }
        println!(
            "  MSI-X: {} vectors routed to eventfds in one call; ERR index: {} vector(s){}",
            msix.count,
            err_irq.count,
            if err_irq.count > 0 {
                ", eventfd registered and released"
            } else {
                ""
            }
        );
        // EN, NVM command set, 4 KiB pages, 64-byte SQEs, 16-byte CQEs.
        bar.write32(0x14, 1 | (6 << 16) | (4 << 20)).map_err(err)?;
        let up = wait_bit(&bar, 0x1c, 1, 1, timeout)?;
        let csts = bar.read32(0x1c).map_err(err)?;
        if csts & 2 != 0 {
            return Err(format!("controller fatal status after enable: CSTS {csts:#x}"));
        }
        // Identify (06h), CNS 1 (controller), command id 0x42, data to PRP1.
        let fill = || -> Option<()> {
            sq.write::<u32>(0, 0x06 | (0x42 << 16))?;
            sq.write::<u64>(24, data_iova)?;
            sq.write::<u32>(40, 1)
        };
        fill().ok_or("SQ entry out of bounds")?;
        fence(Ordering::SeqCst);
        let t = Instant::now();
        bar.write32(0x1000, 1).map_err(err)?;
        let dw3 = loop {
            let dw3 = cq.read::<u32>(12).ok_or("CQ out of bounds")?;
            if dw3 & (1 << 16) != 0 {
                fence(Ordering::Acquire);
                break dw3;
            }
            if t.elapsed() > Duration::from_secs(5) {
                return Err("no completion for Identify within 5 s".into());
            }
            thread::sleep(Duration::from_micros(100));
        };
        let took = t.elapsed();
        bar.write32(0x1000 + stride, 1).map_err(err)?;
        // The admin CQ interrupts on vector 0: its eventfd counts the completion.
        let fired = loop {
            match efds.first().map(|e| e.read()) {
                Some(Ok(n)) => break Some(n),
                _ if t.elapsed() > Duration::from_secs(2) => break None,
                _ => thread::sleep(Duration::from_millis(1)),
            }
        };
        dev.disable_irq(irq::MSIX).map_err(err)?;
        match fired {
            Some(n) => println!("  MSI-X vector 0 fired for the admin completion (eventfd count {n})"),
            None => return Err("MSI-X vector 0 never fired for the admin completion".into()),
        }
        let status = (dw3 >> 17) & 0x7fff;
        let cid = dw3 & 0xffff;
        let mut id = [0u8; 64];
        data.copy_to(0, &mut id).ok_or("data out of bounds")?;
        let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_owned();
        let vid = u16::from_le_bytes([id[0], id[1]]);
        println!(
            "  NVMe Identify by DMA: ready in {}, completion in {} (cid {cid:#x} status {status:#x}): \
             VID {vid:04x} SN {:?} MN {:?}",
            ms(up),
            ms(took),
            text(&id[4..24]),
            text(&id[24..64])
        );
        bar.write32(0x14, 0).map_err(err)?;
        wait_bit(&bar, 0x1c, 1, 0, timeout)?;
        let mut pci_vendor = [0u8; 2];
        dev.read_config(0, &mut pci_vendor).map_err(err)?;
        if status != 0 || cid != 0x42 {
            return Err(format!("completion status {status:#x} cid {cid:#x}"));
        }
        if vid != u16::from_le_bytes(pci_vendor) || text(&id[4..24]).is_empty() {
            return Err(format!(
                "identify data does not look like a controller's: VID {vid:04x}"
            ));
        }
        Ok(())
    }

    // ----------------------------------------------------------------------- hold

    /// Opens `addr` with the REQ eventfd registered and keeps it `secs` seconds whatever
    /// the kernel asks, then closes it. Prints "hold: open" once the device is open.
    fn hold(addr: PciAddress, secs: u64) -> Res {
        let root = SysfsRoot::new(SYS);
        let registry = RemovalRegistry::new();
        let dev = VfioDevice::open(&root, addr).map_err(|e| format!("VfioDevice::open: {e}"))?;
        let efd = dev.request_eventfd().map_err(err)?;
        let t = Instant::now();
        println!("hold: open {addr}, REQ eventfd registered, keeping it {secs} s");
        let mut requests = 0;
        while t.elapsed() < Duration::from_secs(secs) {
            if dev.poll_request(&efd, &registry) {
                requests += 1;
                println!(
                    "hold: removal request {requests} at +{} (ignored)",
                    ms(t.elapsed())
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        drop(dev);
        println!(
            "hold: released {addr} at +{} after {requests} request(s)",
            ms(t.elapsed())
        );
        Ok(())
    }

    // ----------------------------------------------------------------------- seed

    /// The seed deadlock, in one process: removal requested while this process holds the
    /// device; the scan must keep away from the device's blocking attributes.
    fn seed(addr: PciAddress) -> Res {
        let root = SysfsRoot::new(SYS);
        let registry = Arc::new(RemovalRegistry::new());
        let scanner = BlockingAttr::ALL.into_iter().fold(
            Scanner::new(root.clone())
                .registry(Arc::clone(&registry))
                .timeout(Duration::from_secs(2)),
            Scanner::read_blocking,
        );
        let mut checks = Checks::default();

        let dev = VfioDevice::open(&root, addr).map_err(|e| format!("VfioDevice::open: {e}"))?;
        let efd = dev.request_eventfd().map_err(err)?;
        let applicable: BTreeSet<&str> = {
            let before = scanner.scan().map_err(err)?;
            let d = before.get(addr).ok_or("device not listed before the removal")?;
            checks.check(!d.removal_pending && d.problems.is_empty(), || {
                format!(
                    "before removal: pending {} problems {:?}",
                    d.removal_pending, d.problems
                )
            });
            BlockingAttr::ALL
                .into_iter()
                .filter(|a| d.sriov.is_some() || !a.name().starts_with("sriov"))
                .map(BlockingAttr::name)
                .collect()
        };

        let remove_path = root.device_dir(addr).join("remove");
        let t0 = Instant::now();
        let remover = thread::spawn(move || {
            let r = std::fs::write(&remove_path, "1");
            (r, t0.elapsed())
        });
        let mut requested = None;
        while t0.elapsed() < Duration::from_secs(15) {
            if dev.poll_request(&efd, &registry) {
                requested = Some(t0.elapsed());
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        let mut scanned = false;
        match requested {
            None => checks.check(false, || "no REQ signal within 15 s of writing remove".into()),
            Some(at) => {
                println!("seed: REQ eventfd signalled {} after the remove write", ms(at));
                checks.check(registry.is_pending(addr), || {
                    "poll_request did not mark the registry".into()
                });
                let t = Instant::now();
                let scan = scanner.scan();
                let took = t.elapsed();
                let still_pending = !remover.is_finished();
                println!(
                    "seed: scan with all blocking attributes during the pending removal took {} \
                     (removal still pending: {still_pending})",
                    ms(took)
                );
                checks.check(still_pending, || {
                    "the remove finished before we closed the device".into()
                });
                checks.check(took < Duration::from_millis(500), || {
                    format!("scan took {}", ms(took))
                });
                match scan {
                    Err(e) => checks.check(false, || format!("scan failed: {e}")),
                    Ok(scan) => {
                        scanned = true;
                        match scan.get(addr) {
                            None => checks
                                .check(false, || "device not listed while its removal is pending".into()),
                            Some(d) => {
                                println!(
                                    "seed: {addr} removal_pending {}, problems: {}",
                                    d.removal_pending,
                                    d.problems
                                        .iter()
                                        .map(|p| p.to_string())
                                        .collect::<Vec<_>>()
                                        .join("; ")
                                );
                                checks.check(d.removal_pending, || "removal_pending is false".into());
                                checks.check(d.vendor.is_some() && d.class.is_some(), || {
                                    "ids not read for the pending device".into()
                                });
                                let pending: BTreeSet<&str> = d
                                    .problems
                                    .iter()
                                    .filter(|p| p.kind == ProblemKind::RemovalPending)
                                    .map(|p| p.attribute)
                                    .collect();
                                checks.check(pending == applicable, || {
                                    format!(
                                        "RemovalPending problems for {pending:?}, expected {applicable:?}"
                                    )
                                });
                                checks.check(d.problems.len() == pending.len(), || {
                                    format!("other problems too: {:?}", d.problems)
                                });
                                checks.check(
                                    d.driver_override.is_none()
                                        && d.uevent.is_none()
                                        && d.sriov_vf_total_msix.is_none(),
                                    || "a blocking attribute was read".into(),
                                );
                            }
                        }
                    }
                }
            }
        }
        // Close the device: the kernel can finish the removal.
        let t = Instant::now();
        drop(efd);
        drop(dev);
        let (r, at) = remover.join().map_err(|_| "remove thread panicked")?;
        println!(
            "seed: closed the device; the remove write returned {:?} {} after the close ({} after it began)",
            r.as_ref().map_err(|e| e.to_string()),
            ms(t.elapsed()),
            ms(at)
        );
        checks.check(r.is_ok(), || format!("remove write failed: {r:?}"));
        checks.check(!root.device_dir(addr).exists(), || {
            "device directory still there".into()
        });
        if scanned {
            let t = Instant::now();
            let scan = scanner.scan().map_err(err)?;
            println!(
                "seed: scan after the removal took {}: {} devices, released {:?}, registry empty {}",
                ms(t.elapsed()),
                scan.devices.len(),
                scan.released.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                registry.is_empty()
            );
            checks.check(scan.get(addr).is_none(), || "device still listed".into());
            checks.check(scan.released.contains(&addr), || {
                format!("released {:?}", scan.released)
            });
            checks.check(registry.is_empty(), || {
                format!("registry still holds {:?}", registry.pending())
            });
        }
        checks.done("seed")
    }
}
