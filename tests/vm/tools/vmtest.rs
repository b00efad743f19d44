//! `pcibus-vmtest`: the guest side of the VM tests (tests/vm/guest/*.sh). Each subcommand
//! checks one claim of pcibus against a real kernel, prints what it measured, and exits 1
//! with the reasons when the claim does not hold.
//!
//! ```text
//! pcibus-vmtest list-json            pcibus list --json agrees with the sysfs files
//! pcibus-vmtest vfio-open ADDR       open through VFIO: BAR0, config space, regions, reset
//! pcibus-vmtest vfio-dma ADDR        map DMA buffers in the IOMMU; an NVMe Identify by DMA
//! pcibus-vmtest hold ADDR SECONDS    keep ADDR open through VFIO, ignoring removal requests
//! pcibus-vmtest hold-claimed ADDR STOP SECONDS  claim ADDR and keep it open until the file
//!                                    STOP exists (at most SECONDS); fail if its config
//!                                    space or BAR0 stopped answering or changed meanwhile
//! pcibus-vmtest kernel-hot-reset ADDR ask the kernel for a hot reset of ADDR with only
//!                                    what this process holds, bypassing pcibus's check;
//!                                    succeed if the kernel refuses (prints its errno)
//! pcibus-vmtest seed ADDR            the same-process removal: REQ, registry, scans
//! pcibus-vmtest claim-release ADDR S claim ADDR, open it, on REQ mark the claim
//!                                    releasing and release S seconds later
//! pcibus-vmtest claim-hold ADDR S    claim ADDR (claims directory, SPDK's lock file) for
//!                                    S seconds without opening it
//! pcibus-vmtest try-claim ADDR       succeed if the claim is refused (another holder)
//! pcibus-vmtest vfio-group A B       two functions of one IOMMU group open in one container
//! pcibus-vmtest held-scan-exit ADDR  hold ADDR, scan with --read all while it is removed,
//!                                    release on REQ and exit
//! pcibus-vmtest held-scan-exit VF --pf PF   the same for a VF, removed by someone else's
//!                                    `echo 0 > PF/sriov_numvfs`; PF's attributes watched too
//! pcibus-vmtest config-opens CMD...  run CMD; count the opens of every device's `config`
//!                                    meanwhile (inotify)
//! pcibus-vmtest replug ADDR N        one container: ADDR read by DMA, then N times removed,
//!                                    rescanned, bound to vfio-pci, reopened, read again
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

    use pcibus::removal::held;
    use pcibus::vfio::{
        COMMAND, COMMAND_MEMORY, Container, DmaBuffer, DmaRegion, MappedBar, RegionFlags, VfioBackend,
        VfioDevice, VfioError, irq,
    };
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
            ["dma-bench", addr] => addr.parse().map_err(err).and_then(dma_bench),
            ["hold", addr, secs] => addr
                .parse()
                .map_err(err)
                .and_then(|a| hold(a, secs.parse().map_err(err)?)),
            ["hold-claimed", addr, stop, secs] => addr
                .parse()
                .map_err(err)
                .and_then(|a| hold_claimed(a, Path::new(stop), secs.parse().map_err(err)?)),
            ["kernel-hot-reset", addr] => addr.parse().map_err(err).and_then(kernel_hot_reset),
            ["seed", addr] => addr.parse().map_err(err).and_then(seed),
            ["claim-release", addr, secs] => addr
                .parse()
                .map_err(err)
                .and_then(|a| claim_release(a, secs.parse().map_err(err)?)),
            ["claim-hold", addr, secs] => addr
                .parse()
                .map_err(err)
                .and_then(|a| claim_hold(a, secs.parse().map_err(err)?)),
            ["try-claim", addr] => addr.parse().map_err(err).and_then(try_claim),
            ["vfio-group", a, b] => a
                .parse()
                .map_err(err)
                .and_then(|a| vfio_group(a, b.parse().map_err(err)?)),
            ["held-scan-exit", addr] => addr.parse().map_err(err).and_then(|a| held_scan_exit(a, None)),
            ["held-scan-exit", addr, "--pf", pf] => addr
                .parse()
                .map_err(err)
                .and_then(|a| held_scan_exit(a, Some(pf.parse().map_err(err)?))),
            ["bus", addr, secs] => addr
                .parse()
                .map_err(err)
                .and_then(|a| bus(a, secs.parse().map_err(err)?, 1)),
            ["kernel-perf", dev, qd, secs] => qd
                .parse()
                .map_err(err)
                .and_then(|qd| kernel_perf(dev, qd, secs.parse().map_err(err)?)),
            ["bus-replug", addr, secs] => addr
                .parse()
                .map_err(err)
                .and_then(|a| bus(a, secs.parse().map_err(err)?, 2)),
            ["bus-d3hot", addr] => addr.parse().map_err(err).and_then(bus_d3hot),
            ["bus-set-vfs", addr] => addr.parse().map_err(err).and_then(bus_set_vfs),
            ["nvme-caller-memory", addr] => addr.parse().map_err(err).and_then(nvme_caller_memory),
            ["aer-wait", addr, secs] => addr
                .parse()
                .map_err(err)
                .and_then(|a| aer_wait(a, secs.parse().map_err(err)?)),
            ["config-opens", cmd @ ..] if !cmd.is_empty() => config_opens(cmd),
            ["replug", addr, n] => addr
                .parse()
                .map_err(err)
                .and_then(|a| replug(a, n.parse().map_err(err)?)),
            _ => Err(
                "usage: pcibus-vmtest list-json | vfio-open ADDR | vfio-dma ADDR | dma-bench ADDR | \
                      hold ADDR SECONDS | hold-claimed ADDR STOP SECONDS | \
                      kernel-hot-reset ADDR | seed ADDR | vfio-group ADDR ADDR | \
                      held-scan-exit ADDR [--pf PF] | \
                      claim-release ADDR SECONDS | claim-hold ADDR SECONDS | try-claim ADDR | bus ADDR SECONDS | \
                      bus-replug ADDR SECONDS | bus-d3hot ADDR | kernel-perf BLOCKDEV QD SECONDS | \
                      config-opens CMD [ARG...] | replug ADDR N | aer-wait ADDR SECONDS | \
                      nvme-caller-memory ADDR"
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

    /// The backend the harness asked for (`PCIBUS_VFIO_BACKEND`, set per boot by
    /// tests/vm/init), resolved on this kernel.
    fn backend() -> VfioBackend {
        VfioBackend::from_env().unwrap_or_default().resolve()
    }

    /// A new container of that backend.
    fn new_container() -> Result<Arc<Container>, VfioError> {
        Container::with_backend(backend())
    }

    /// Opens `addr` in a new container of that backend: what VfioDevice::open does with
    /// the backend chosen.
    fn open_dev(root: &SysfsRoot, addr: PciAddress) -> Result<Arc<VfioDevice>, VfioError> {
        VfioDevice::open_in(root, addr, &new_container()?)
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
        // Registry ids as the schema has them: lowercase hex of fixed width.
        let hex =
            |v: Option<u64>, width: usize| v.map_or(Value::Null, |v| Value::from(format!("{v:0width$x}")));
        let numa = read_trim(&dir.join("numa_node")).and_then(|s| s.parse::<i64>().ok());
        vec![
            ("vendor", hex(hex_file(dir, "vendor"), 4)),
            ("device", hex(hex_file(dir, "device"), 4)),
            ("subsystem_vendor", hex(hex_file(dir, "subsystem_vendor"), 4)),
            ("subsystem_device", hex(hex_file(dir, "subsystem_device"), 4)),
            ("class", hex(hex_file(dir, "class"), 6)),
            ("revision", hex(hex_file(dir, "revision"), 2)),
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
        for extra in [&[][..], &["--ids", "id-files"][..], &["--ids", "config"][..]] {
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
                        summary.push(match want.as_str() {
                            Some(text) => format!("{key}={text}"),
                            None => format!("{key}={want}"),
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

    fn region_flag_names(flags: RegionFlags) -> Vec<&'static str> {
        [
            (RegionFlags::READ, "read"),
            (RegionFlags::WRITE, "write"),
            (RegionFlags::MMAP, "mmap"),
            (RegionFlags::CAPS, "caps"),
        ]
        .into_iter()
        .filter(|(bit, _)| flags.contains(*bit))
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

        // SR-IOV facts from sysfs, read before the open: once this process holds the device,
        // its blocking attributes (sriov_numvfs) are off limits.
        let sysfs_numvfs = read_trim(&dir.join("sriov_numvfs")).and_then(|s| s.parse::<u16>().ok());
        let sysfs_totalvfs = read_trim(&dir.join("sriov_totalvfs")).and_then(|s| s.parse::<u16>().ok());

        let t = Instant::now();
        let dev = open_dev(&root, addr).map_err(|e| format!("VfioDevice::open: {e}"))?;
        checks.check(held::is_held(addr), || {
            "the open device is not registered as held".into()
        });
        let group = pcibus::vfio::iommu_group(&root, addr).map_err(err)?;
        println!(
            "opened {addr} in {} through the {} backend: group {group}, {} regions, {} irq indexes",
            ms(t.elapsed()),
            dev.backend(),
            dev.num_regions(),
            dev.num_irqs()
        );
        checks.check(dev.backend() == backend(), || {
            format!("opened through {}, asked for {}", dev.backend(), backend())
        });
        checks.check(info["backend"].as_str() == Some(backend().name()), || {
            format!("vfio info backend {} vs {}", info["backend"], backend())
        });
        checks.check(
            dev.group().map(|g| g.number()) == (backend() == VfioBackend::Group).then_some(group),
            || {
                format!(
                    "group handle {:?} for the {} backend",
                    dev.group().map(|g| g.number()),
                    backend()
                )
            },
        );
        checks.check(info["group"].as_u64() == Some(group.into()), || {
            format!("vfio info group {} vs {group}", info["group"])
        });
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
                    j["count"].as_u64() == Some(i.count.into())
                        && j["flags"].as_u64() == Some(i.flags.bits().into())
                }),
                || format!("irq {index}: vfio info {j:?} vs {i:?}"),
            );
            println!(
                "  irq {index} {}: count {} flags {:#x}",
                irq::NAMES.get(index as usize).unwrap_or(&"?"),
                i.count,
                i.flags.bits()
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

        // Clearing Memory Space Enable under a live mapping is refused; the Command
        // register is unchanged and the mapping still reads.
        let mut cmd = [0u8; 2];
        dev.read_config(COMMAND, &mut cmd).map_err(err)?;
        let cmd = u16::from_le_bytes(cmd);
        let refused = dev.write_config(COMMAND, &(cmd & !COMMAND_MEMORY).to_le_bytes());
        println!("  write_config clearing Memory Space Enable with BAR0 mapped: {refused:?}");
        checks.check(
            matches!(refused, Err(VfioError::MemorySpaceInUse { mapped_bars: 1, .. })),
            || format!("clearing MSE under a mapping: {refused:?}"),
        );
        checks.check(
            matches!(
                dev.disable_memory_space(),
                Err(VfioError::MemorySpaceInUse { .. })
            ),
            || "disable_memory_space under a mapping was not refused".into(),
        );
        let mut after = [0u8; 2];
        dev.read_config(COMMAND, &mut after).map_err(err)?;
        checks.check(
            u16::from_le_bytes(after) & COMMAND_MEMORY == cmd & COMMAND_MEMORY,
            || {
                format!(
                    "Command changed from {cmd:#x} to {:#x}",
                    u16::from_le_bytes(after)
                )
            },
        );
        checks.check(bar0.read64(0).map_err(err)? == cap, || "CAP changed".into());

        // What the blocking sysfs attributes say, from config space through VFIO.
        let msix = dev.msix_table_size().map_err(err)?;
        let msix_irqs = dev.irq_info(irq::MSIX).map_err(err)?.count;
        println!("  MSI-X table size from config space: {msix:?} (VFIO MSI-X count {msix_irqs})");
        checks.check(msix.map(u32::from) == Some(msix_irqs), || {
            format!("MSI-X table size {msix:?}, VFIO reports {msix_irqs} vectors")
        });
        let sriov = dev.sriov().map_err(err)?;
        println!(
            "  SR-IOV from config space: {:?}; sysfs before the open: numvfs {sysfs_numvfs:?} totalvfs {sysfs_totalvfs:?}",
            sriov.map(|s| (s.num_vfs, s.total_vfs))
        );
        checks.check(dev.sriov_num_vfs().map_err(err)? == sysfs_numvfs, || {
            format!(
                "NumVFs {:?} vs sysfs sriov_numvfs {sysfs_numvfs:?}",
                sriov.map(|s| s.num_vfs)
            )
        });
        checks.check(dev.sriov_total_vfs().map_err(err)? == sysfs_totalvfs, || {
            format!(
                "TotalVFs {:?} vs sysfs sriov_totalvfs {sysfs_totalvfs:?}",
                sriov.map(|s| s.total_vfs)
            )
        });

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
        // Without mappings, the explicit way works, and memory space comes back on.
        checks.check(dev.mapped_bars() == 1, || {
            format!("{} mappings", dev.mapped_bars())
        });
        drop(bar0);
        checks.check(dev.mapped_bars() == 0, || {
            format!("{} mappings after drop", dev.mapped_bars())
        });
        dev.disable_memory_space()
            .map_err(|e| format!("disable_memory_space: {e}"))?;
        let mut off = [0u8; 2];
        dev.read_config(COMMAND, &mut off).map_err(err)?;
        dev.write_config(COMMAND, &(u16::from_le_bytes(off) | COMMAND_MEMORY).to_le_bytes())
            .map_err(err)?;
        println!(
            "  without mappings: Memory Space Enable cleared (Command {:#06x}) and set again",
            u16::from_le_bytes(off)
        );
        checks.check(u16::from_le_bytes(off) & COMMAND_MEMORY == 0, || {
            "disable_memory_space left the bit set".into()
        });
        let bar0 = dev.map_bar(0).map_err(err)?;
        checks.check(bar0.read64(0).map_err(err)? == cap, || {
            "CAP after re-enabling memory".into()
        });
        // A mapping keeps the device open: dropping our handle first closes nothing.
        let t = Instant::now();
        drop(dev);
        checks.check(held::is_held(addr), || "released while a mapping lives".into());
        checks.check(bar0.read32(8).map_err(err)? == vs, || {
            "VS through the mapping that outlived the handle".into()
        });
        drop(bar0);
        println!("  closed in {}", ms(t.elapsed()));
        checks.check(!held::is_held(addr), || {
            "still held after the last handle went".into()
        });
        checks.done("vfio-open")
    }

    /// Reads and checks NVMe CAP and VS; returns them.
    fn nvme_cap_vs(bar0: &MappedBar, checks: &mut Checks) -> Res<(u64, u32)> {
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
        let dev = open_dev(&root, addr).map_err(|e| format!("VfioDevice::open: {e}"))?;
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
        let mut maps: Vec<DmaRegion> = Vec::new();
        for len in [4096usize, 64 << 10, 2 << 20] {
            let buf = DmaBuffer::new(len).map_err(|e| format!("DmaBuffer::new({len}): {e}"))?;
            let huge = buf.is_huge();
            let t = Instant::now();
            let m = container.map(buf).map_err(|e| format!("map {len} bytes: {e}"))?;
            println!(
                "  mapped {len:#x} bytes ({}) at IOVA {:#x} in {}",
                if huge { "huge pages" } else { "4 KiB pages" },
                m.iova(),
                ms(t.elapsed())
            );
            checks.check(inside(m.iova(), m.size()), || {
                format!("IOVA {:#x}+{:#x} outside the ranges", m.iova(), m.size())
            });
            checks.check(m.iova() % info.min_page_size() == 0, || {
                format!("IOVA {:#x} misaligned", m.iova())
            });
            checks.check(m.size() >= len as u64, || {
                format!("mapped {} bytes of {len}", m.size())
            });
            for other in &maps {
                checks.check(
                    m.iova() + m.size() <= other.iova() || other.iova() + other.size() <= m.iova(),
                    || format!("IOVA {:#x} overlaps {:#x}", m.iova(), other.iova()),
                );
            }
            maps.push(m);
        }

        // The device really reaches the buffers at those IOVAs: an NVMe Identify Controller.
        let [sq, cq, data] = <[DmaRegion; 3]>::try_from(maps).map_err(|_| "three regions")?;
        let first = match nvme_identify(&dev, &sq, &cq, &data) {
            Ok(id) => Some(id),
            Err(e) => {
                checks.check(false, || format!("NVMe Identify by DMA: {e}"));
                None
            }
        };

        // Dropping a region unmaps it: a new buffer gets the same IOVA (the kernel would
        // refuse a second mapping there with EEXIST), and the device writes into the new
        // buffer, not the old one.
        let (old_iova, old_size) = (data.iova(), data.size());
        let t = Instant::now();
        drop(data);
        println!(
            "  dropped the 2 MiB region at IOVA {old_iova:#x} (unmapped in {})",
            ms(t.elapsed())
        );
        let data = container
            .alloc_dma(old_size as usize)
            .map_err(|e| format!("map after drop: {e}"))?;
        println!("  a new 2 MiB region got IOVA {:#x}", data.iova());
        checks.check(data.iova() == old_iova, || {
            format!("IOVA {old_iova:#x} not reused after drop: got {:#x}", data.iova())
        });
        if first.is_some() {
            match nvme_identify(&dev, &sq, &cq, &data) {
                Ok(id) => {
                    println!(
                        "  Identify again into the new region at the reused IOVA: same data {}",
                        Some(id) == first
                    );
                    checks.check(Some(id) == first, || "the second Identify differs".into());
                }
                Err(e) => checks.check(false, || format!("Identify into the reused IOVA: {e}")),
            }
        }
        checks.check(container.leaked().is_empty(), || {
            format!("leaked IOVA ranges {:x?}", container.leaked())
        });

        // An explicit unmap gives the buffer back, and it can be mapped again.
        let sq_iova = sq.iova();
        let t = Instant::now();
        let buf = sq.unmap().map_err(|e| format!("unmap IOVA {sq_iova:#x}: {e}"))?;
        println!("  unmapped IOVA {sq_iova:#x} in {}, buffer back", ms(t.elapsed()));
        buf.write::<u32>(0, 0x5a5a_5a5a)
            .ok_or("write to the unmapped buffer")?;
        let again = container
            .map(buf)
            .map_err(|e| format!("map the buffer again: {e}"))?;
        println!("  remapped it at IOVA {:#x}", again.iova());
        checks.check(
            inside(again.iova(), again.size()) && again.iova() == sq_iova,
            || format!("remapped at IOVA {:#x}, expected {sq_iova:#x}", again.iova()),
        );
        checks.check(again.read::<u32>(0) == Some(0x5a5a_5a5a), || {
            "contents lost".into()
        });
        // The IOVA chosen by the kernel (iommufd; the group backend takes the allocator's)
        // and one chosen by the caller: the device reaches both.
        let chosen = container
            .map_kernel_iova(DmaBuffer::new(4096).map_err(err)?)
            .map_err(|e| format!("map at a kernel-chosen IOVA: {e}"))?;
        let fixed_iova = 1u64 << 37;
        let fixed = container
            .map_at(DmaBuffer::new(4096).map_err(err)?, fixed_iova)
            .map_err(|e| format!("map at IOVA {fixed_iova:#x}: {e}"))?;
        println!(
            "  {} backend: kernel-chosen IOVA {:#x}, fixed IOVA {:#x}",
            container.backend(),
            chosen.iova(),
            fixed.iova()
        );
        checks.check(inside(chosen.iova(), 4096) && fixed.iova() == fixed_iova, || {
            format!("kernel-chosen {:#x}, fixed {:#x}", chosen.iova(), fixed.iova())
        });
        checks.check(
            matches!(
                container.map_at(DmaBuffer::new(4096).map_err(err)?, fixed_iova),
                Err(VfioError::IovaUnavailable { .. })
            ),
            || "a second map at the same fixed IOVA was not refused".into(),
        );
        if let Some(first) = first {
            for (what, region) in [("kernel-chosen", &chosen), ("fixed", &fixed)] {
                match nvme_identify(&dev, &again, &cq, region) {
                    Ok(id) => checks.check(id == first, || format!("Identify into the {what} IOVA differs")),
                    Err(e) => checks.check(false, || format!("Identify into the {what} IOVA: {e}")),
                }
            }
        }
        drop((chosen, fixed));

        // Regions may outlive the device: the container lives as long as they do.
        drop(dev);
        drop((again, cq, data));
        checks.check(container.leaked().is_empty(), || {
            format!("leaked IOVA ranges {:x?}", container.leaked())
        });
        checks.done("vfio-dma")
    }

    // ------------------------------------------------------------------ dma-bench

    /// DMA map and unmap cost of each backend the kernel has, in this one guest: `ADDR`
    /// is opened in a container of each backend in turn, and the same buffers are mapped
    /// and unmapped through it many times. Prints one line per backend and size, and a
    /// JSON summary line (`dma-bench: {...}`).
    fn dma_bench(addr: PciAddress) -> Res {
        let root = SysfsRoot::new(SYS);
        let mut results = serde_json::Map::new();
        for backend in [VfioBackend::Group, VfioBackend::Iommufd] {
            let container = match Container::with_backend(backend) {
                Ok(c) => c,
                Err(e) => {
                    println!("{backend}: not available here ({e})");
                    continue;
                }
            };
            let dev = VfioDevice::open_in(&root, addr, &container)
                .map_err(|e| format!("{backend}: open {addr}: {e}"))?;
            let mut per_size = serde_json::Map::new();
            for (len, rounds) in [(4096usize, 4000u32), (64 << 10, 2000), (2 << 20, 400)] {
                let mut buf = DmaBuffer::new(len).map_err(err)?;
                // One round first: page faults and the allocator's first split are not
                // what is measured.
                buf = container.map(buf).map_err(err)?.unmap().map_err(err)?;
                let (mut map_ns, mut unmap_ns) = (Vec::new(), Vec::new());
                for _ in 0..rounds {
                    let t = Instant::now();
                    let region = container
                        .map(buf)
                        .map_err(|e| format!("{backend}: map {len}: {e}"))?;
                    let mapped = Instant::now();
                    buf = region
                        .unmap()
                        .map_err(|e| format!("{backend}: unmap {len}: {e}"))?;
                    map_ns.push((mapped - t).as_nanos() as u64);
                    unmap_ns.push(mapped.elapsed().as_nanos() as u64);
                }
                map_ns.sort_unstable();
                unmap_ns.sort_unstable();
                let median = |v: &[u64]| v[v.len() / 2];
                let p99 = |v: &[u64]| v[v.len() * 99 / 100];
                println!(
                    "{backend:<8} {:>7} bytes{}: map median {:>7} ns (p99 {:>7}), unmap median {:>7} ns (p99 {:>7}), {rounds} rounds",
                    len,
                    if buf.is_huge() { " (2 MiB page)" } else { "" },
                    median(&map_ns),
                    p99(&map_ns),
                    median(&unmap_ns),
                    p99(&unmap_ns)
                );
                per_size.insert(
                    len.to_string(),
                    serde_json::json!({
                        "map_ns": median(&map_ns), "map_p99_ns": p99(&map_ns),
                        "unmap_ns": median(&unmap_ns), "unmap_p99_ns": p99(&unmap_ns),
                        "huge": buf.is_huge(), "rounds": rounds,
                    }),
                );
            }
            results.insert(backend.to_string(), serde_json::Value::Object(per_size));
            drop(dev);
        }
        if results.is_empty() {
            return Err("no backend could open the device".into());
        }
        println!("dma-bench: {}", serde_json::Value::Object(results));
        Ok(())
    }

    fn wait_bit(bar: &MappedBar, off: u64, mask: u32, want: u32, timeout: Duration) -> Res<Duration> {
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
    fn nvme_identify(
        dev: &Arc<VfioDevice>,
        sq: &DmaRegion,
        cq: &DmaRegion,
        data: &DmaRegion,
    ) -> Res<[u8; 64]> {
        let (sq_iova, cq_iova, data_iova) = (sq.iova(), cq.iova(), data.iova());
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
        // Identify (06h), CNS 1 (controller), command id 0x42, data to PRP1: one 64-byte
        // submission entry written as an object.
        let mut sqe = [0u32; 16];
        sqe[0] = 0x06 | (0x42 << 16);
        sqe[6] = data_iova as u32;
        sqe[7] = (data_iova >> 32) as u32;
        sqe[10] = 1;
        sq.write_obj(0, &sqe).ok_or("SQ entry out of bounds")?;
        fence(Ordering::SeqCst);
        let t = Instant::now();
        bar.write32(0x1000, 1).map_err(err)?;
        let dw3 = loop {
            // The phase word with acquire ordering, then the whole 16-byte entry.
            let dw3 = cq.load_acquire::<u32>(12).ok_or("CQ out of bounds")?;
            if dw3 & (1 << 16) != 0 {
                let cqe: [u32; 4] = cq.read_obj(0).ok_or("CQ out of bounds")?;
                if cqe[3] != dw3 {
                    return Err(format!(
                        "CQE dword 3 {:#x} after the phase word read {dw3:#x}",
                        cqe[3]
                    ));
                }
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
        data.read_at(0, &mut id).ok_or("data out of bounds")?;
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
        Ok(id)
    }

    // ----------------------------------------------------------------- vfio-group

    /// Two functions of one IOMMU group, opened in one container: with the group backend
    /// the second open reuses the group the first opened (the kernel lets a group be open
    /// once), with iommufd both bind to the one iommufd; opening one in a second container
    /// is refused (group: EBUSY on /dev/vfio/N; iommufd: EPERM for the other device of the
    /// group, whose DMA belongs to the first iommufd, EINVAL for a device open already);
    /// the container keeps the IOVA space (and its DMA mappings) after
    /// the devices close, and releases the group when it goes.
    fn vfio_group(a: PciAddress, b: PciAddress) -> Res {
        let root = SysfsRoot::new(SYS);
        let mut checks = Checks::default();
        let groups_backend = backend() == VfioBackend::Group;
        let ga = pcibus::vfio::iommu_group(&root, a).map_err(err)?;
        let gb = pcibus::vfio::iommu_group(&root, b).map_err(err)?;
        if ga != gb {
            return Err(format!("{a} is in group {ga}, {b} in group {gb}"));
        }
        let t = Instant::now();
        let dev_a = open_dev(&root, a).map_err(|e| format!("open {a}: {e}"))?;
        let container = Arc::clone(dev_a.container());
        if !groups_backend {
            // iommufd: the group's DMA belongs to the first iommufd once a device of it is
            // bound there, so another iommufd cannot have the other device (EPERM).
            match open_dev(&root, b) {
                Err(VfioError::GroupBusy { group, source, .. }) => {
                    println!("  {b} in a second iommufd while {a} is bound to the first: {source}");
                    checks.check(
                        source.raw_os_error() == Some(nix::libc::EPERM) && group == Some(ga),
                        || {
                            format!(
                                "second iommufd: {source} (group {group:?}), expected EPERM for group {ga}"
                            )
                        },
                    );
                }
                Err(e) => checks.check(false, || format!("{b} in a second iommufd: unexpected error {e}")),
                Ok(_) => checks.check(false, || format!("{b} opened in a second iommufd")),
            }
        }
        let dev_b = VfioDevice::open_in(&root, b, &container)
            .map_err(|e| format!("open {b} in the same container: {e}"))?;
        println!(
            "opened {a} and {b} of group {ga} in one {} container in {}",
            container.backend(),
            ms(t.elapsed())
        );
        let same_group = match (dev_a.group(), dev_b.group()) {
            (Some(x), Some(y)) => Arc::ptr_eq(x, y),
            (None, None) => !groups_backend,
            _ => false,
        };
        checks.check(same_group, || {
            "the two devices have different Group handles".into()
        });
        let expected_groups = if groups_backend { vec![ga] } else { vec![] };
        checks.check(container.groups() == expected_groups, || {
            format!("container groups {:?}", container.groups())
        });
        // A second container cannot have the group: the kernel's rule, reported as such.
        match open_dev(&root, b) {
            Err(VfioError::OpenGroup { group, source, .. }) if groups_backend => {
                println!("  a second container: open /dev/vfio/{group} refused: {source}");
                checks.check(source.raw_os_error() == Some(nix::libc::EBUSY), || {
                    format!("second container: {source}, expected EBUSY")
                });
            }
            Err(VfioError::AlreadyOpen { source, .. }) if !groups_backend => {
                // A device open in one iommufd cannot be opened again anywhere (EINVAL).
                println!("  {b} again, in a second iommufd: refused, open already: {source}");
                checks.check(source.raw_os_error() == Some(nix::libc::EINVAL), || {
                    format!("second open of {b}: {source}, expected EINVAL")
                });
            }
            Err(e) => checks.check(false, || format!("second container: unexpected error {e}")),
            Ok(_) => checks.check(false, || "a second container opened the group too".into()),
        }
        for dev in [&dev_a, &dev_b] {
            let mut id = [0u8; 2];
            dev.read_config(0, &mut id).map_err(err)?;
            let vendor = hex_file(&root.device_dir(dev.address()), "vendor");
            println!(
                "  {}: vendor {:04x} through VFIO, {vendor:x?} in sysfs",
                dev.address(),
                u16::from_le_bytes(id)
            );
            checks.check(vendor == Some(u16::from_le_bytes(id).into()), || {
                format!("{}: vendor differs", dev.address())
            });
        }
        let region = container
            .alloc_dma(4096)
            .map_err(|e| format!("DMA map in the shared container: {e}"))?;
        println!(
            "  DMA region at IOVA {:#x} in the shared container",
            region.iova()
        );
        // The container keeps its IOVA space after its devices close: the region mapped in
        // it stays valid, and a device of the group opens again.
        drop(dev_a);
        let mut id = [0u8; 2];
        dev_b
            .read_config(0, &mut id)
            .map_err(|e| format!("{b} after closing {a}: {e}"))?;
        drop(dev_b);
        checks.check(container.groups() == expected_groups, || {
            format!("groups after closing both devices: {:?}", container.groups())
        });
        let dev_a = VfioDevice::open_in(&root, a, &container)
            .map_err(|e| format!("reopen {a} in the same container: {e}"))?;
        if groups_backend {
            checks.check(
                Arc::ptr_eq(
                    dev_a.group().ok_or("no group handle")?,
                    &container.group(&root, ga).map_err(err)?,
                ),
                || "reopen got another group handle".into(),
            );
        }
        let second = container
            .alloc_dma(4096)
            .map_err(|e| format!("DMA map after reopening: {e}"))?;
        drop(dev_a);
        let (r1, r2) = (region.iova(), second.iova());
        region
            .unmap()
            .map_err(|e| format!("unmap IOVA {r1:#x} after the devices closed: {e}"))?;
        second.unmap().map_err(|e| format!("unmap IOVA {r2:#x}: {e}"))?;
        println!("  closed both, reopened {a} in the same container, mapped and unmapped in it");
        checks.check(container.leaked().is_empty(), || {
            format!("leaked {:x?}", container.leaked())
        });
        // With the container gone the group is free: a new container can have it.
        drop(container);
        let again = open_dev(&root, a).map_err(|e| format!("reopen {a} after the container went: {e}"))?;
        println!(
            "  after the container went: reopened {a} in a new {} container",
            again.backend()
        );
        drop(again);
        checks.done("vfio-group")
    }

    // ------------------------------------------------------------- held-scan-exit

    /// What one scan said about the held device.
    #[derive(Debug)]
    struct Seen {
        phase: &'static str,
        took: Duration,
        listed: bool,
        // Blocking attributes of the held device whose value was reported.
        values: Vec<&'static str>,
        // (attribute, problem) for the held device's blocking attributes.
        problems: Vec<(&'static str, ProblemKind)>,
        // The same two for the watched PF.
        pf_values: Vec<&'static str>,
        pf_problems: Vec<(&'static str, ProblemKind)>,
    }

    // The blocking attributes of `d` that have a value, and its problems among them.
    fn blocking_seen(d: &pcibus::DeviceRecord) -> (Vec<&'static str>, Vec<(&'static str, ProblemKind)>) {
        let mut values = Vec::new();
        if d.driver_override.is_some() {
            values.push("driver_override");
        }
        if d.uevent.is_some() {
            values.push("uevent");
        }
        if d.sriov_vf_total_msix.is_some() {
            values.push("sriov_vf_total_msix");
        }
        if d.sriov.as_ref().is_some_and(|s| s.num_vfs.is_some()) {
            values.push("sriov_numvfs");
        }
        let blocking: Vec<&str> = BlockingAttr::ALL.into_iter().map(BlockingAttr::name).collect();
        let problems = d
            .problems
            .iter()
            .filter(|p| blocking.contains(&p.attribute))
            .map(|p| (p.attribute, p.kind.clone()))
            .collect();
        (values, problems)
    }

    /// §3 of issue 6: this process holds `addr` through VFIO with the REQ eventfd
    /// registered, and scans with every blocking attribute requested, sharing a registry,
    /// while another thread writes `remove`. On the REQ it releases the device; the removal
    /// completes, the scans stop, and the process exits. No scan may report a value read
    /// from the held device's blocking attributes.
    ///
    /// With `pf` (issue 14 §1), `addr` is a VF of `pf` and this process does not remove it:
    /// it prints `held-scan-exit: holding` and waits for the REQ that someone else's
    /// `echo 0 > PF/sriov_numvfs` brings, which holds the PF's device lock until the VF is
    /// closed.
    /// No scan may report a value of the PF's lock-taking attributes, or a read of them
    /// that timed out, while the VF is held (a submitted read would wait on this process).
    fn held_scan_exit(addr: PciAddress, pf: Option<PciAddress>) -> Res {
        const GRACE_MS: u64 = 250;
        use std::sync::atomic::AtomicU8;
        let root = SysfsRoot::new(SYS);
        let registry = Arc::new(RemovalRegistry::new());
        let mut checks = Checks::default();
        let t0 = Instant::now();

        let dev = open_dev(&root, addr).map_err(|e| format!("VfioDevice::open: {e}"))?;
        let efd = dev.request_eventfd().map_err(err)?;
        // A VF's controller may be offline (no resources assigned): map BAR0 all the same,
        // a mapping holds the device too, but its registers say nothing here.
        let bar0 = dev.map_bar(0).map_err(err)?;
        let vs = bar0.read32(8).map_err(err)?;
        println!("held-scan-exit: holding {addr} (NVMe VS {vs:#x}), REQ eventfd registered");

        // 0 held, 1 REQ seen, 2 released, 3 stop.
        let phase = Arc::new(AtomicU8::new(0));
        let scanner = {
            let root = root.clone();
            let registry = Arc::clone(&registry);
            let phase = Arc::clone(&phase);
            thread::spawn(move || {
                let scanner = BlockingAttr::ALL.into_iter().fold(
                    Scanner::new(root)
                        .registry(registry)
                        .timeout(Duration::from_secs(2)),
                    Scanner::read_blocking,
                );
                let mut seen = Vec::new();
                loop {
                    let p = phase.load(Ordering::Acquire);
                    if p == 3 {
                        break;
                    }
                    let t = Instant::now();
                    let scan = scanner.scan();
                    let took = t.elapsed();
                    let names = ["held", "requested", "released"];
                    let mut s = Seen {
                        phase: names[usize::from(p.min(2))],
                        took,
                        listed: false,
                        values: Vec::new(),
                        problems: Vec::new(),
                        pf_values: Vec::new(),
                        pf_problems: Vec::new(),
                    };
                    if let Ok(scan) = &scan
                        && let Some(d) = scan.get(addr)
                    {
                        s.listed = true;
                        (s.values, s.problems) = blocking_seen(d);
                    }
                    if let Ok(scan) = &scan
                        && let Some(d) = pf.and_then(|pf| scan.get(pf))
                    {
                        (s.pf_values, s.pf_problems) = blocking_seen(d);
                    }
                    // A scan the release overtook (begun while held or requested, ended
                    // after it) may have read the PF after the release, which is allowed:
                    // it counts as released.
                    if phase.load(Ordering::Acquire) >= 2 {
                        s.phase = names[2];
                    }
                    seen.push(s);
                    thread::sleep(Duration::from_millis(20));
                }
                seen
            })
        };

        thread::sleep(Duration::from_millis(300));
        let remove_path = root.device_dir(addr).join("remove");
        // With a PF, the removal comes from outside (the test script's sriov_numvfs write).
        let remover = match pf {
            None => {
                let t = Instant::now();
                Some(thread::spawn(move || {
                    let r = std::fs::write(&remove_path, "1");
                    (r, t.elapsed())
                }))
            }
            Some(_) => {
                println!("held-scan-exit: holding; waiting for the REQ");
                None
            }
        };
        let t_remove = Instant::now();
        let mut requested = None;
        let req_wait = Duration::from_secs(if pf.is_some() { 30 } else { 15 });
        while t_remove.elapsed() < req_wait {
            if dev.poll_request(&efd, &registry) {
                requested = Some(Instant::now());
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        let Some(t_req) = requested else {
            phase.store(3, Ordering::Release);
            drop((bar0, dev, efd));
            return Err(format!("no REQ within {} s", req_wait.as_secs()));
        };
        phase.store(1, Ordering::Release);
        println!(
            "held-scan-exit: REQ {} after the remove write (or the wait began); registry pending {}",
            ms(t_req - t_remove),
            registry.is_pending(addr)
        );
        checks.check(registry.is_pending(addr), || {
            "poll_request did not mark the registry".into()
        });
        // A driver finishes what is in flight before it lets go; the scans go on meanwhile,
        // against a device whose removal is pending and which is still held.
        thread::sleep(Duration::from_millis(GRACE_MS));
        // Release: the mapping and the device (the mapping holds the device too).
        drop(bar0);
        drop(dev);
        drop(efd);
        phase.store(2, Ordering::Release);
        checks.check(!held::is_held(addr), || "still held after the release".into());
        println!(
            "held-scan-exit: released {} after the REQ ({GRACE_MS} ms of it a grace for in-flight work)",
            ms(t_req.elapsed())
        );

        // The removal completes.
        let finished = |r: &Option<thread::JoinHandle<_>>| match r {
            Some(r) => r.is_finished(),
            None => !root.device_dir(addr).exists(),
        };
        while !finished(&remover) && t_req.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_millis(5));
        }
        match remover {
            Some(remover) if remover.is_finished() => {
                let (r, at) = remover.join().map_err(|_| "remove thread panicked")?;
                println!(
                    "held-scan-exit: the remove write returned {:?} {} after it began",
                    r.as_ref().map_err(|e| e.to_string()),
                    ms(at)
                );
                checks.check(r.is_ok(), || format!("remove write failed: {r:?}"));
            }
            Some(_) => checks.check(false, || {
                "the remove write had not returned 10 s after the release".into()
            }),
            // Removed from outside: the directory's going (checked below) is the sign.
            None => println!(
                "held-scan-exit: the device was gone {} after the REQ",
                ms(t_req.elapsed())
            ),
        }
        checks.check(!root.device_dir(addr).exists(), || {
            "device directory still there".into()
        });

        // The scans stop (a scan thread stuck in a read of the device would not).
        thread::sleep(Duration::from_millis(100));
        phase.store(3, Ordering::Release);
        let t_stop = Instant::now();
        while !scanner.is_finished() && t_stop.elapsed() < Duration::from_secs(5) {
            thread::sleep(Duration::from_millis(5));
        }
        if !scanner.is_finished() {
            checks.check(false, || "the scan thread did not stop within 5 s".into());
            return checks.done("held-scan-exit");
        }
        let seen = scanner.join().map_err(|_| "scan thread panicked")?;
        for phase in ["held", "requested", "released"] {
            let of: Vec<&Seen> = seen.iter().filter(|s| s.phase == phase).collect();
            let slowest = of.iter().map(|s| s.took).max().unwrap_or_default();
            let listed = of.iter().filter(|s| s.listed).count();
            let kinds: BTreeSet<String> = of
                .iter()
                .flat_map(|s| s.problems.iter().map(|(a, k)| format!("{a}: {k}")))
                .collect();
            println!(
                "held-scan-exit: {} scan(s) while {phase} (slowest {}), device listed in {listed}; problems: {kinds:?}",
                of.len(),
                ms(slowest)
            );
        }
        checks.check(seen.iter().any(|s| s.phase == "held" && s.listed), || {
            "no scan listed the device while it was held".into()
        });
        checks.check(seen.iter().any(|s| s.phase == "requested" && s.listed), || {
            "no scan ran between the REQ and the release".into()
        });
        for s in &seen {
            checks.check(s.values.is_empty(), || {
                format!(
                    "a scan while {} reported values of the held device's blocking attributes {:?}",
                    s.phase, s.values
                )
            });
            for (attr, kind) in &s.problems {
                checks.check(
                    matches!(kind, ProblemKind::HeldOpen | ProblemKind::RemovalPending),
                    || format!("a scan while {}: {attr}: {kind}", s.phase),
                );
            }
        }
        if let Some(pf) = pf {
            for phase in ["held", "requested", "released"] {
                let kinds: BTreeSet<String> = seen
                    .iter()
                    .filter(|s| s.phase == phase)
                    .flat_map(|s| s.pf_problems.iter().map(|(a, k)| format!("{a}: {k}")))
                    .collect();
                println!("held-scan-exit: PF {pf} while {phase}: problems {kinds:?}");
            }
            checks.check(
                seen.iter()
                    .any(|s| s.phase == "held" && !s.pf_problems.is_empty()),
                || format!("no scan while held reported the PF {pf}'s attributes as skipped"),
            );
            for s in &seen {
                // While the VF is held, a read of the PF's lock-taking attributes could wait on
                // this process; after the release it may wait (briefly) for the kernel.
                if s.phase != "released" {
                    checks.check(s.pf_values.is_empty(), || {
                        format!(
                            "a scan while {} read the PF's lock-taking attributes {:?}",
                            s.phase, s.pf_values
                        )
                    });
                }
                for (attr, kind) in &s.pf_problems {
                    checks.check(
                        matches!(kind, ProblemKind::HeldOpen | ProblemKind::RemovalPending),
                        || format!("a scan while {}: PF {pf} {attr}: {kind}", s.phase),
                    );
                }
            }
        }
        println!("held-scan-exit: exiting {} after start", ms(t0.elapsed()));
        checks.done("held-scan-exit")
    }

    // --------------------------------------------------------------------- replug

    /// The DMA regions of one Identify: admin SQ, admin CQ, data.
    struct IdentifyDma {
        sq: DmaRegion,
        cq: DmaRegion,
        data: DmaRegion,
    }

    impl IdentifyDma {
        fn map(container: &Arc<Container>) -> Result<IdentifyDma, VfioError> {
            Ok(IdentifyDma {
                sq: container.alloc_dma(4096)?,
                cq: container.alloc_dma(4096)?,
                data: container.alloc_dma(4096)?,
            })
        }

        /// Unmaps all three explicitly (what their drop does, but with the error) and
        /// frees their buffers; returns the failures.
        fn unmap(self) -> Vec<String> {
            let mut failed = Vec::new();
            for (what, region) in [("SQ", self.sq), ("CQ", self.cq), ("data", self.data)] {
                let iova = region.iova();
                if let Err(e) = region.unmap() {
                    failed.push(format!("unmap of the {what} region at IOVA {iova:#x}: {e}"));
                }
            }
            failed
        }
    }

    /// What one open of the device holds, as a driver would: the device, its REQ eventfd,
    /// a BAR 0 mapping.
    struct Held {
        dev: Arc<VfioDevice>,
        efd: EventFd,
        bar0: MappedBar,
    }

    /// Whether `e` (or an error below it) is the errno `errno`.
    fn has_errno(e: &(dyn std::error::Error + 'static), errno: i32) -> bool {
        let mut cur = Some(e);
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && io.raw_os_error() == Some(errno)
            {
                return true;
            }
            cur = e.source();
        }
        false
    }

    /// The device's VFIO cdev (`vfio-dev/vfioN`), if the kernel made one.
    fn vfio_cdev(root: &SysfsRoot, addr: PciAddress) -> Option<String> {
        std::fs::read_dir(root.device_dir(addr).join("vfio-dev"))
            .ok()?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .next()
    }

    /// Opens `addr` in `container`, registers the REQ eventfd, maps a spare DMA region
    /// (first, so it gets the lowest free IOVA) and the three of an Identify, reads
    /// Identify Controller by DMA into them ([`replug_identify`]) and maps BAR 0. Returns
    /// the spare region and the IOMMU group number too.
    fn replug_open(
        root: &SysfsRoot,
        container: &Arc<Container>,
        addr: PciAddress,
        round: u32,
        first: &mut Option<[u8; 64]>,
        checks: &mut Checks,
    ) -> Res<(Held, IdentifyDma, DmaRegion, u32)> {
        let t = Instant::now();
        let dev = VfioDevice::open_in(root, addr, container).map_err(|e| {
            let enodev = has_errno(&e, nix::libc::ENODEV);
            format!(
                "round {round}: open {addr} in the shared container{}: {e}",
                if enodev { " failed with ENODEV" } else { "" }
            )
        })?;
        let opened = t.elapsed();
        let sysfs_group = pcibus::vfio::iommu_group(root, addr).map_err(err)?;
        let group = dev.group().map(|g| g.number());
        match group {
            Some(g) => {
                println!(
                    "replug: round {round}: opened {addr} in {}: IOMMU group {g}, container's groups {:?}",
                    ms(opened),
                    container.groups()
                );
                checks.check(g == sysfs_group, || {
                    format!("round {round}: opened through group {g}, sysfs says {sysfs_group}")
                });
                // Dead groups are forgotten at lookup: the one just opened is attached.
                checks.check(container.groups().contains(&g), || {
                    format!("round {round}: group {g} not among the container's groups")
                });
            }
            None => println!(
                "replug: round {round}: opened {addr} in {}: IOMMU group {sysfs_group}, cdev {}, IOAS {:?} (iommufd: no groups in the container)",
                ms(opened),
                vfio_cdev(root, addr).unwrap_or_else(|| "?".into()),
                container.ioas_id()
            ),
        }
        let efd = dev.request_eventfd().map_err(err)?;
        let t = Instant::now();
        let outliving = container
            .alloc_dma(4096)
            .map_err(|e| format!("round {round}: map the spare DMA region: {e}"))?;
        let dma = IdentifyDma::map(container).map_err(|e| format!("round {round}: map DMA regions: {e}"))?;
        println!(
            "replug: round {round}: DMA regions at IOVAs {:#x} (spare) {:#x} {:#x} {:#x} (mapped in {}), IOMMU page sizes {:#x}",
            outliving.iova(),
            dma.sq.iova(),
            dma.cq.iova(),
            dma.data.iova(),
            ms(t.elapsed()),
            container.iommu_info().map_or(0, |i| i.page_sizes)
        );
        replug_identify(root, &dev, [&dma.sq, &dma.cq, &dma.data], round, first, checks);
        let bar0 = dev.map_bar(0).map_err(err)?;
        Ok((Held { dev, efd, bar0 }, dma, outliving, sysfs_group))
    }

    /// An NVMe Identify Controller by DMA (admin SQ, CQ, data): its PCI vendor id must be the one
    /// of config space (checked by `nvme_identify` against VFIO's config region, here
    /// against sysfs `vendor` too), and its first 64 bytes the same every time (the same
    /// controller came back).
    fn replug_identify(
        root: &SysfsRoot,
        dev: &Arc<VfioDevice>,
        [sq, cq, data]: [&DmaRegion; 3],
        round: u32,
        first: &mut Option<[u8; 64]>,
        checks: &mut Checks,
    ) {
        match nvme_identify(dev, sq, cq, data) {
            Ok(id) => {
                let vid = u16::from_le_bytes([id[0], id[1]]);
                let sysfs_vendor = hex_file(&root.device_dir(dev.address()), "vendor");
                checks.check(sysfs_vendor == Some(u64::from(vid)), || {
                    format!("round {round}: Identify VID {vid:04x}, sysfs vendor {sysfs_vendor:x?}")
                });
                match first {
                    None => *first = Some(id),
                    Some(first) => checks.check(*first == id, || {
                        format!("round {round}: Identify data differs from the first round's")
                    }),
                }
            }
            Err(e) => checks.check(false, || format!("round {round}: NVMe Identify by DMA: {e}")),
        }
    }

    /// Issue 14 §2: a VFIO container survives its device's hot removal. ONE container for
    /// the whole run: `addr` (on vfio-pci) is opened in it and read by DMA (NVMe Identify
    /// Controller), then `rounds` times removed through sysfs `remove` (the holder drops
    /// its BAR mapping and the device on the REQ), the previous DMA regions unmapped (no
    /// leak), the bus rescanned, the device bound to vfio-pci again, reopened in the same
    /// container (group backend: under a new or recycled group number, which the
    /// container must not serve from its stale table, ENODEV; and with its IOMMU set up
    /// again if it lost it) and read by DMA into new regions. One spare region of each
    /// round outlives the device into the next open, where its IOVA may have gone to the
    /// new spare: it is dropped then, and a second Identify into the new spare must land.
    /// At the end no munmap failed and the container leaked nothing. Prints the group of
    /// every round.
    fn replug(addr: PciAddress, rounds: u32) -> Res {
        let root = SysfsRoot::new(SYS);
        let registry = RemovalRegistry::new();
        let mut checks = Checks::default();
        let t0 = Instant::now();
        let container = new_container().map_err(|e| format!("container: {e}"))?;
        let groups_backend = container.backend() == VfioBackend::Group;
        println!(
            "replug: {} backend, one container for {addr} and {rounds} re-plug(s){}",
            container.backend(),
            if groups_backend {
                ""
            } else {
                " (iommufd: the IOAS keeps its mappings; no groups to forget, no IOMMU to set up again)"
            }
        );
        let mut first = None;
        let (mut holding, mut dma, mut outliving, group) =
            replug_open(&root, &container, addr, 0, &mut first, &mut checks)?;
        let mut groups = vec![group];
        for round in 1..=rounds {
            // Remove, from another thread: the write blocks until the device is released.
            let remove_path = root.device_dir(addr).join("remove");
            let t = Instant::now();
            let remover = thread::spawn(move || {
                let r = std::fs::write(&remove_path, "1");
                (r, t.elapsed())
            });
            let mut req = None;
            while t.elapsed() < Duration::from_secs(15) {
                if holding.dev.poll_request(&holding.efd, &registry) {
                    req = Some(t.elapsed());
                    break;
                }
                thread::sleep(Duration::from_millis(5));
            }
            checks.check(req.is_some(), || {
                format!("round {round}: no REQ within 15 s of the remove write")
            });
            // Release: the BAR mapping, the device, its eventfd.
            let Held { dev, efd, bar0 } = holding;
            drop(bar0);
            drop(dev);
            drop(efd);
            checks.check(!held::is_held(addr), || {
                format!("round {round}: still held after the release")
            });
            let released = t.elapsed();
            while !remover.is_finished() && t.elapsed() < released + Duration::from_secs(10) {
                thread::sleep(Duration::from_millis(5));
            }
            if !remover.is_finished() {
                checks.check(false, || {
                    format!("round {round}: the remove write had not returned 10 s after the release")
                });
                return checks.done("replug");
            }
            let (r, returned) = remover.join().map_err(|_| "remove thread panicked")?;
            checks.check(r.is_ok(), || format!("round {round}: remove write failed: {r:?}"));
            while root.device_dir(addr).exists() && t.elapsed() < returned + Duration::from_secs(5) {
                thread::sleep(Duration::from_millis(5));
            }
            let gone = !root.device_dir(addr).exists();
            println!(
                "replug: round {round}: REQ {} after the remove write, released at {}, remove returned at {}, directory gone {gone}",
                req.map_or("never".into(), ms),
                ms(released),
                ms(returned)
            );
            checks.check(gone, || format!("round {round}: device directory still there"));

            // The previous regions outlived their device: they unmap cleanly, whether the
            // container's IOMMU is still there or went with the device's group.
            let t = Instant::now();
            // (container.groups() is not asked here: it would forget the dead group before
            // the reopen's lookup has to.)
            let failed = IdentifyDma::unmap(dma);
            let leaked = container.leaked();
            println!(
                "replug: round {round}: previous DMA regions unmapped in {} ({} failed); container IOMMU {}, leaked {leaked:x?}",
                ms(t.elapsed()),
                failed.len(),
                match (groups_backend, container.iommu_info().is_some()) {
                    (false, _) => "kept (iommufd IOAS)",
                    (true, true) => "still set up",
                    (true, false) => "found gone (released with the last group)",
                },
            );
            for f in failed {
                checks.check(false, || format!("round {round}: {f}"));
            }
            checks.check(leaked.is_empty(), || {
                format!("round {round}: leaked IOVA ranges {leaked:x?}")
            });

            // Back: rescan, wait for the kernel's driver (nvme probes asynchronously), bind
            // to vfio-pci, reopen in the same container.
            let t = Instant::now();
            std::fs::write("/sys/bus/pci/rescan", "1").map_err(|e| format!("rescan: {e}"))?;
            let rescanned = t.elapsed();
            while !root.device_dir(addr).exists() && t.elapsed() < Duration::from_secs(10) {
                thread::sleep(Duration::from_millis(5));
            }
            if !root.device_dir(addr).exists() {
                checks.check(false, || {
                    format!("round {round}: {addr} did not come back on rescan")
                });
                return checks.done("replug");
            }
            let back = t.elapsed();
            let mut driver = None;
            while t.elapsed() < back + Duration::from_secs(10) {
                driver = pcibus::sysfs::bind::current_driver(&root, addr);
                if driver.is_some() {
                    break;
                }
                thread::sleep(Duration::from_millis(5));
            }
            let probed = t.elapsed();
            let binding = pcibus::sysfs::bind::bind(&root, addr, "vfio-pci", false)
                .map_err(|e| format!("round {round}: bind {addr} to vfio-pci: {e}"));
            println!(
                "replug: round {round}: rescan returned in {}, device back at {}, on {} at {}, on vfio-pci at {}",
                ms(rescanned),
                ms(back),
                driver.as_deref().unwrap_or("no driver"),
                ms(probed),
                ms(t.elapsed())
            );
            if let Err(e) = binding {
                checks.check(false, || e);
                return checks.done("replug");
            }
            let spare = match replug_open(&root, &container, addr, round, &mut first, &mut checks) {
                Ok((h, d, spare, group)) => {
                    (holding, dma) = (h, d);
                    groups.push(group);
                    spare
                }
                Err(e) => {
                    checks.check(false, || e);
                    return checks.done("replug");
                }
            };

            // The previous spare region outlived its device into the reopen: where the
            // IOMMU was set up again, its IOVA is now the new spare's (both were mapped
            // first), which its drop must not unmap: an Identify into the new spare then
            // still reaches it.
            let stale = std::mem::replace(&mut outliving, spare);
            let stale_iova = stale.iova();
            let unmapped = stale.unmap();
            println!(
                "replug: round {round}: the previous spare region (IOVA {stale_iova:#x}{}) dropped after the reopen: {}",
                if outliving.iova() == stale_iova {
                    ", the new spare's too"
                } else {
                    ""
                },
                match &unmapped {
                    Ok(_) => "ok".to_owned(),
                    Err(e) => e.to_string(),
                }
            );
            checks.check(unmapped.is_ok(), || {
                format!("round {round}: the previous spare region: {:?}", unmapped.err())
            });
            replug_identify(
                &root,
                &holding.dev,
                [&dma.sq, &dma.cq, &outliving],
                round,
                &mut first,
                &mut checks,
            );
        }
        // The last regions unmap from a live IOMMU; then the device goes.
        let mut failed = IdentifyDma::unmap(dma);
        if let Err(e) = outliving.unmap() {
            failed.push(format!("unmap of the spare region: {e}"));
        }
        for f in failed {
            checks.check(false, || format!("at the end: {f}"));
        }
        drop(holding);
        let failures = pcibus::vfio::munmap_failures();
        let leaked = container.leaked();
        println!(
            "replug: {rounds} re-plug(s) in one {} container in {}: IOMMU groups {groups:?}; munmap failures {failures}, leaked {leaked:x?}",
            container.backend(),
            ms(t0.elapsed())
        );
        checks.check(failures == 0, || format!("{failures} munmap failure(s)"));
        checks.check(leaked.is_empty(), || format!("leaked IOVA ranges {leaked:x?}"));
        checks.done("replug")
    }

    // ----------------------------------------------------------------------- hold

    /// Opens `addr` with the REQ eventfd registered and keeps it `secs` seconds whatever
    /// the kernel asks, then closes it. Prints "hold: open" once the device is open.
    fn hold(addr: PciAddress, secs: u64) -> Res {
        let root = SysfsRoot::new(SYS);
        let registry = RemovalRegistry::new();
        let dev = open_dev(&root, addr).map_err(|e| format!("VfioDevice::open: {e}"))?;
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

    /// What a holder checks of its device: config dwords 0 (ids) and 1 (command,
    /// status: only the command half is compared), and BAR0's first dword if BAR0 maps.
    fn device_words(
        dev: &Arc<VfioDevice>,
        bar0: Option<&pcibus::vfio::MappedBar>,
    ) -> Res<(u32, u16, Option<u32>)> {
        let mut cfg = [0u8; 8];
        dev.read_config(0, &mut cfg).map_err(err)?;
        let ids = u32::from_le_bytes([cfg[0], cfg[1], cfg[2], cfg[3]]);
        let command = u16::from_le_bytes([cfg[4], cfg[5]]);
        let bar = match bar0 {
            Some(b) => Some(b.read32(0).map_err(err)?),
            None => None,
        };
        Ok((ids, command, bar))
    }

    /// Claims `addr` (as the bus would: the record names this PID and command), opens it
    /// through VFIO, maps BAR0 if it can, and keeps it until the file `stop` exists (at
    /// most `secs` seconds), reading its config space and BAR0 every 20 ms. Fails if a
    /// read failed or answered all ones, or if the ids, the command register or BAR0's
    /// first dword changed: what another process's hot reset of the bus would do to it.
    fn hold_claimed(addr: PciAddress, stop: &Path, secs: u64) -> Res {
        use pcibus::bus::claim::{ClaimDir, ClaimInfo};
        let root = SysfsRoot::new(SYS);
        let claim = ClaimDir::for_claiming()
            .claim(addr, &ClaimInfo::new().driver("vmtest hold-claimed"))
            .map_err(|e| format!("claim: {e}"))?;
        let dev = open_dev(&root, addr).map_err(|e| format!("VfioDevice::open: {e}"))?;
        let bar0 = dev.map_bar(0).ok();
        let first = device_words(&dev, bar0.as_ref())?;
        println!(
            "hold-claimed: {addr} claimed and open by PID {}: ids {:#010x}, command {:#06x}, BAR0[0] {}; ready",
            std::process::id(),
            first.0,
            first.1,
            first.2.map_or("not mapped".into(), |v| format!("{v:#010x}"))
        );
        let mut checks = Checks::default();
        let t = Instant::now();
        let mut reads = 0u64;
        while !stop.exists() && t.elapsed() < Duration::from_secs(secs) {
            match device_words(&dev, bar0.as_ref()) {
                Ok(now) if now == first => {}
                Ok(now) => {
                    checks.check(false, || {
                        format!("at +{}: {now:x?}, was {first:x?}", ms(t.elapsed()))
                    });
                    break;
                }
                Err(e) => {
                    checks.check(false, || format!("at +{}: read failed: {e}", ms(t.elapsed())));
                    break;
                }
            }
            reads += 1;
            thread::sleep(Duration::from_millis(20));
        }
        checks.check(first.0 != u32::MAX, || "config space reads all ones".into());
        drop(bar0);
        drop(dev);
        drop(claim);
        println!(
            "hold-claimed: released {addr} at +{}: {reads} reads, all the same",
            ms(t.elapsed())
        );
        checks.done("hold-claimed")
    }

    /// Asks the kernel for a hot reset of `addr` with only what this process holds: the
    /// group of `addr` (group backend) or no fds (iommufd), without pcibus's check of the
    /// affected devices, so that what the kernel answers when another process holds one
    /// is seen. Succeeds if the kernel refuses, printing its errno.
    fn kernel_hot_reset(addr: PciAddress) -> Res {
        use std::os::fd::AsRawFd;
        // VFIO_DEVICE_PCI_HOT_RESET: _IO(';', 100 + 13), with a struct vfio_pci_hot_reset.
        nix::ioctl_write_ptr_bad!(vfio_pci_hot_reset, nix::request_code_none!(b';', 113), u32);
        let root = SysfsRoot::new(SYS);
        let dev = open_dev(&root, addr).map_err(|e| format!("open {addr}: {e}"))?;
        let groups: Vec<i32> = dev.group().map(|g| g.as_fd().as_raw_fd()).into_iter().collect();
        // struct vfio_pci_hot_reset { argsz, flags, count, group_fds[] }
        let mut buf: Vec<u32> = vec![0; 3 + groups.len()];
        buf[0] = (buf.len() * 4) as u32;
        buf[2] = groups.len() as u32;
        for (slot, fd) in buf[3..].iter_mut().zip(&groups) {
            *slot = *fd as u32;
        }
        // SAFETY: `buf` is a live u32 array laid out as struct vfio_pci_hot_reset followed
        // by `count` group fds, open while `dev` (which holds its group) lives; argsz gives
        // its size and the kernel only reads it.
        let r = unsafe { vfio_pci_hot_reset(dev.as_fd().as_raw_fd(), buf.as_ptr()) };
        match r {
            Ok(_) => Err(format!(
                "the kernel hot reset {addr}'s bus with {} group fd(s) from this process",
                groups.len()
            )),
            Err(e) => {
                println!(
                    "kernel-hot-reset: {addr} ({} backend, {} group fd(s)): the kernel refused: {} ({})",
                    dev.backend(),
                    groups.len(),
                    e.desc(),
                    e
                );
                Ok(())
            }
        }
    }

    // ------------------------------------------------------------------ claims

    /// Claims `addr` (claims directory from $PCIBUS_CLAIM_DIR), opens it through VFIO and
    /// waits for a removal request; then says so in its claim ("releasing"), keeps the
    /// device `secs` more seconds (a slow release), and releases device and claim.
    fn claim_release(addr: PciAddress, secs: u64) -> Res {
        use pcibus::bus::claim::{ClaimDir, ClaimInfo};
        let root = SysfsRoot::new(SYS);
        let registry = RemovalRegistry::new();
        let claims = ClaimDir::from_env();
        let claim = claims
            .claim(addr, &ClaimInfo::new().driver("vmtest"))
            .map_err(|e| format!("claim: {e}"))?;
        let dev = open_dev(&root, addr).map_err(|e| format!("VfioDevice::open: {e}"))?;
        let efd = dev.request_eventfd().map_err(err)?;
        println!("claim-release: {addr} claimed and open; ready");
        let t = Instant::now();
        while !dev.poll_request(&efd, &registry) {
            if t.elapsed() > Duration::from_secs(60) {
                return Err("no removal request within 60 s".into());
            }
            thread::sleep(Duration::from_millis(10));
        }
        claim.mark_releasing("vfio removal request").map_err(err)?;
        println!(
            "claim-release: REQ at +{}; marked releasing, keeping it {secs} s",
            ms(t.elapsed())
        );
        thread::sleep(Duration::from_secs(secs));
        drop(dev);
        drop(claim);
        println!("claim-release: released at +{}", ms(t.elapsed()));
        Ok(())
    }

    /// Claims `addr` as the bus and the DPDK drop-in do ([`ClaimDir::for_claiming`]: the
    /// claims directory and SPDK's lock file), without opening it, and keeps the claim `secs`
    /// seconds. Prints "claim-hold: ... ready" once it holds it.
    ///
    /// [`ClaimDir::for_claiming`]: pcibus::bus::claim::ClaimDir::for_claiming
    fn claim_hold(addr: PciAddress, secs: u64) -> Res {
        use pcibus::bus::claim::{ClaimDir, ClaimInfo};
        let claim = ClaimDir::for_claiming()
            .claim(addr, &ClaimInfo::new().driver("vmtest"))
            .map_err(|e| format!("claim: {e}"))?;
        println!(
            "claim-hold: {addr} claimed by pid {} ({}); ready, keeping it {secs} s",
            std::process::id(),
            claim.path().display()
        );
        thread::sleep(Duration::from_secs(secs));
        claim.release().map_err(err)?;
        println!("claim-hold: {addr} released");
        Ok(())
    }

    /// Tries to claim `addr`; succeeds (exit 0) when refused because another live process
    /// holds it, printing the refusal.
    fn try_claim(addr: PciAddress) -> Res {
        use pcibus::bus::claim::{ClaimDir, ClaimError, ClaimInfo};
        match ClaimDir::from_env().claim(addr, &ClaimInfo::new()) {
            Ok(_) => Err(format!("{addr} was free to claim")),
            Err(e @ ClaimError::Held { pid: Some(_), .. }) => {
                println!("try-claim: refused: {e}");
                Ok(())
            }
            Err(e) => Err(format!("unexpected claim error: {e}")),
        }
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

        let dev = open_dev(&root, addr).map_err(|e| format!("VfioDevice::open: {e}"))?;
        let efd = dev.request_eventfd().map_err(err)?;
        let applicable: BTreeSet<&str> = {
            let before = scanner.scan().map_err(err)?;
            let d = before.get(addr).ok_or("device not listed before the removal")?;
            // The blocking attributes of a device this process holds are never read: with
            // the scanner's held check they carry HeldOpen problems.
            checks.check(
                !d.removal_pending && d.problems.iter().all(|p| p.kind == ProblemKind::HeldOpen),
                || {
                    format!(
                        "before removal: pending {} problems {:?}",
                        d.removal_pending, d.problems
                    )
                },
            );
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
                                    .filter(|p| {
                                        matches!(p.kind, ProblemKind::RemovalPending | ProblemKind::HeldOpen)
                                    })
                                    .map(|p| p.attribute)
                                    .collect();
                                checks.check(pending == applicable, || {
                                    format!(
                                        "RemovalPending or HeldOpen problems for {pending:?}, expected {applicable:?}"
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

    // ------------------------------------------------------------------------ bus

    /// A driver for the bus test: takes NVMe controllers (class 01 08 02), maps BAR 0 and
    /// checks that CAP and VS read as a controller's; lets go on removal. Its state of a
    /// device: the backing and BAR 0.
    struct TestNvme {
        table: [pcibus::bus::id::IdEntry; 1],
    }

    impl pcibus::bus::Driver<pcibus::bus::VfioBacking> for TestNvme {
        type Device = (pcibus::bus::VfioBacking, MappedBar);

        fn name(&self) -> &str {
            "vmtest-nvme"
        }
        fn id_table(&self) -> &[pcibus::bus::id::IdEntry] {
            &self.table
        }
        fn probe(
            &mut self,
            dev: pcibus::bus::ProbeDevice<'_, pcibus::bus::VfioBacking>,
        ) -> pcibus::bus::ProbeOutcome<Self::Device> {
            use pcibus::bus::{DeviceBacking, ProbeOutcome, RegisterIo};
            let bar = match dev.backing.map_bar(0) {
                Ok(b) => b,
                Err(e) => return ProbeOutcome::Failed(e.into()),
            };
            let (cap, vs) = match (RegisterIo::read64(&bar, 0), RegisterIo::read32(&bar, 8)) {
                (Ok(c), Ok(v)) => (c, v),
                (Err(e), _) | (_, Err(e)) => return ProbeOutcome::Failed(e.into()),
            };
            println!("bus: probe {}: CAP {cap:#018x} VS {vs:#010x}", dev.record.address);
            if cap == u64::MAX || vs >> 16 == 0 {
                return ProbeOutcome::Failed(
                    format!("not a working NVMe controller: CAP {cap:#x} VS {vs:#x}").into(),
                );
            }
            ProbeOutcome::Bound((dev.backing.clone(), bar))
        }
        fn remove(&mut self, _device: Self::Device, removal: &pcibus::bus::Removal) {
            println!("bus: remove {}: {}", removal.address, removal.cause);
        }
    }

    /// A bus that takes only `addr` (binding it to vfio-pci, restoring its driver when
    /// dropped), with the test driver registered.
    /// A bus over this system's sysfs that takes only `addr`, binding it to vfio-pci
    /// (through the harness's backend) and restoring its driver at the end; no driver yet.
    fn vfio_bus(addr: PciAddress) -> Res<pcibus::bus::Bus<pcibus::bus::VfioAttach>> {
        use pcibus::bus::devargs::Selection;
        use pcibus::bus::map::DeviceMap;
        use pcibus::bus::{BindPolicy, Bus, VfioAttach};

        let root = SysfsRoot::new(SYS);
        let map = DeviceMap::new(Scanner::new(root.clone())).map_err(err)?;
        let attach = VfioAttach::new(
            root,
            BindPolicy {
                bind: true,
                force: false,
                restore: true,
            },
        )
        .backend(backend());
        let selection = Selection::from_args([("-a", addr.to_string())]).map_err(err)?;
        Ok(Bus::new(map, attach).selection(selection))
    }

    fn test_bus(addr: PciAddress) -> Res<pcibus::bus::Bus<pcibus::bus::VfioAttach>> {
        let mut bus = vfio_bus(addr)?;
        bus.register(Box::new(TestNvme {
            table: [pcibus::bus::id::IdEntry::class(
                0x010802,
                pcibus::bus::id::CLASS_EXACT,
            )],
        }));
        Ok(bus)
    }

    /// Runs a bus with one test driver on `addr` (binding it to vfio-pci, restoring its
    /// driver at the end) and a 200 ms settle delay, printing what the bus does. With
    /// `binds` 1: until the driver loses the device (fails if it never does). With 2:
    /// until the device, lost (unplugged) and back, is bound a second time; then the bus
    /// is dropped, which gives the device back to its previous driver.
    fn bus(addr: PciAddress, secs: u64, binds: usize) -> Res {
        use pcibus::bus::BusEvent;
        use pcibus::hotplug::monitor::UeventMonitor;

        let mut monitor = UeventMonitor::open().map_err(err)?.pci_only(true);
        let mut bus = test_bus(addr)?.settle(Duration::from_millis(200));
        let reports = bus.probe_all();
        for r in &reports {
            match &r.result {
                Ok(d) => println!("bus: {} bound to {d}; ready", r.address),
                Err(e) => return Err(e.to_string()),
            }
        }
        if bus.held().is_empty() {
            return Err(format!("{addr}: no driver took it"));
        }
        let t = Instant::now();
        let mut bound = 1;
        while t.elapsed() < Duration::from_secs(secs) {
            for event in bus
                .wait(Some(&mut monitor), Duration::from_millis(200))
                .map_err(err)?
            {
                println!("bus: +{}: {event}", ms(t.elapsed()));
                match &event {
                    BusEvent::Removed(r) => {
                        if r.leaked != 0 {
                            return Err(format!("the driver kept {} handle(s)", r.leaked));
                        }
                        println!("bus: released {} at +{}", r.address, ms(t.elapsed()));
                        if binds == 1 {
                            return Ok(());
                        }
                    }
                    BusEvent::Probed(p) => match &p.result {
                        Ok(_) => {
                            bound += 1;
                            println!("bus: bound {bound} times");
                            if bound == binds {
                                drop(bus);
                                println!("bus: dropped; {addr} given back");
                                return Ok(());
                            }
                        }
                        Err(e) => return Err(format!("probe after re-plug: {e}")),
                    },
                    _ => {}
                }
            }
        }
        Err(format!("{addr}: not done within {secs} s ({bound} binds)"))
    }

    /// Issue 15 §7 on a real controller: the application's own pages (a `PageBuffer`)
    /// registered with the controller (`Controller::register_buffer`, mapped into the VFIO
    /// container) carry a write out of their first half and a read back into their second;
    /// the controller moved the data (the second half equals the first), and unregistering
    /// gives back the same pages.
    fn nvme_caller_memory(addr: PciAddress) -> Res {
        use pcibus::bus::VfioBacking;
        use pcibus::nvme::{Controller, Options};
        use pcibus::vfio::{DmaBuffer, PAGE, PageBuffer};

        let root = SysfsRoot::new(SYS);
        let dev = open_dev(&root, addr).map_err(|e| format!("VfioDevice::open: {e}"))?;
        let c = Controller::init(VfioBacking::new(dev), &Options::default()).map_err(err)?;
        let ns = c.namespaces().first().cloned().ok_or("no namespace")?;
        let len = 16 * PAGE;
        let blocks = (len / ns.block_size as usize) as u64;
        let mut pages = PageBuffer::new(2 * len).map_err(err)?;
        for (i, b) in pages[..len].iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(11);
        }
        let sent = pages[..len].to_vec();
        let vaddr = pages.as_ptr() as u64;
        let buffer = c
            .register_buffer(DmaBuffer::from_memory(pages).map_err(|(e, _)| e.to_string())?)
            .map_err(err)?;
        println!("caller memory: {} bytes at {vaddr:#x} registered", 2 * len);
        let mut q = c.io_queue(8).map_err(err)?;
        let lba = 4096 / u64::from(ns.block_size) * 256; // 1 MiB in
        q.write(ns.nsid, lba, blocks, &buffer, 0).map_err(err)?;
        q.read(ns.nsid, lba, blocks, &buffer, len).map_err(err)?;
        drop(q);
        let pages: PageBuffer = c
            .unregister_buffer(buffer)
            .map_err(|(e, _)| e.to_string())?
            .into_memory()
            .map_err(|_| "the registered buffer is not the caller's memory".to_string())?;
        let _ = c.shutdown_within(Duration::from_secs(2));
        if pages.as_ptr() as u64 != vaddr {
            return Err("unregistering gave back other pages".into());
        }
        if pages[len..] != sent[..] {
            return Err("what was read back into the caller's pages differs from what was written".into());
        }
        println!("caller memory: {len} bytes written from the caller's pages and read back into them, equal");
        Ok(())
    }

    /// A driver that holds any device and answers errors with `Keep`, counting them.
    struct AerHolder {
        table: [pcibus::bus::id::IdEntry; 1],
    }

    impl pcibus::bus::Driver<pcibus::bus::VfioBacking> for AerHolder {
        type Device = u64;

        fn name(&self) -> &str {
            "vmtest-aer"
        }
        fn id_table(&self) -> &[pcibus::bus::id::IdEntry] {
            &self.table
        }
        fn probe(
            &mut self,
            _dev: pcibus::bus::ProbeDevice<'_, pcibus::bus::VfioBacking>,
        ) -> pcibus::bus::ProbeOutcome<u64> {
            pcibus::bus::ProbeOutcome::Bound(0)
        }
        fn remove(&mut self, _errors: u64, _removal: &pcibus::bus::Removal) {}
        fn error_detected(
            &mut self,
            errors: &mut u64,
            event: &pcibus::bus::errors::ErrorEvent,
        ) -> pcibus::bus::errors::ErrorAction {
            *errors += event.count;
            println!(
                "aer: driver told of {} error(s) of {}",
                event.count, event.address
            );
            pcibus::bus::errors::ErrorAction::Keep
        }
    }

    /// Issue 16 §4 on a real kernel: a device the bus holds reports a PCI Express error
    /// (the test injects one through QEMU's `pcie_aer_inject_error`); the kernel's AER
    /// recovery signals vfio-pci's ERR eventfd, the bus wakes for it, asks the driver
    /// (`error_detected`) and reports `BusEvent::Error`. Prints `aer: ready` once the
    /// device is held, and succeeds at the first error within `secs`.
    fn aer_wait(addr: PciAddress, secs: u64) -> Res {
        use pcibus::bus::BusEvent;

        let mut bus = vfio_bus(addr)?;
        let record = bus
            .map()
            .get(addr)
            .ok_or(format!("{addr}: not in sysfs"))?
            .clone();
        bus.register(Box::new(AerHolder {
            table: [pcibus::bus::id::IdEntry::for_record(&record)],
        }));
        for r in bus.probe_all() {
            r.result.map_err(|e| e.to_string())?;
        }
        if bus.held().is_empty() {
            return Err(format!("{addr}: not held"));
        }
        println!("aer: ready, holding {addr}");
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(secs) {
            for event in bus.wait(None, Duration::from_millis(200)).map_err(err)? {
                println!("aer: +{}: {event}", ms(t.elapsed()));
                if let BusEvent::Error(r) = &event {
                    let told = bus.device_state::<AerHolder>(addr).copied().unwrap_or(0);
                    if r.event.address != addr || told == 0 {
                        return Err(format!("error event {r:?}, driver told of {told}"));
                    }
                    if bus.held().is_empty() {
                        return Err("the device was taken back though the driver kept it".into());
                    }
                    println!("aer: error of {addr} reported, the driver keeps the device");
                    return Ok(());
                }
            }
        }
        Err(format!("{addr}: no error reported within {secs} s"))
    }

    /// Issue 14 §4 on a real kernel: a driver that puts its device in D3hot (its PM
    /// capability's PMCSR, through VFIO's config space) and then touches a BAR gets a
    /// SIGBUS from vfio-pci; the fault handler turns it into all-ones, and the bus, seeing
    /// sysfs `power_state` D3hot and no removal pending, reports a fault, not a removal:
    /// the device stays held. Back in D0 the bus is dropped and the device given back.
    /// Issue 16 §4: `Bus::set_vfs` on a PF the bus holds (vfio-pci's enable_sriov must be
    /// Y): 2 VFs, their addresses from the PF's config space (VF offset and stride) and in
    /// sysfs, more than TotalVFs refused, then 0 again, the VFs gone.
    fn bus_set_vfs(addr: PciAddress) -> Res {
        let mut bus = test_bus(addr)?;
        for r in bus.probe_all() {
            r.result.map_err(|e| e.to_string())?;
        }
        let exists = |a: &PciAddress| std::path::Path::new(&format!("{SYS}/bus/pci/devices/{a}")).exists();
        match bus.set_vfs(addr, 200) {
            Err(e) => println!("bus-set-vfs: 200 VFs refused: {e}"),
            Ok(r) => return Err(format!("200 VFs accepted: {r:?}")),
        }
        let up = bus.set_vfs(addr, 2).map_err(err)?;
        println!(
            "bus-set-vfs: {} -> {} VFs: {}",
            up.previous,
            up.num_vfs,
            up.vfs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        );
        if up.num_vfs != 2 || up.vfs.len() != 2 {
            return Err(format!("not 2 VFs: {up:?}"));
        }
        for vf in &up.vfs {
            let t = Instant::now();
            while !exists(vf) && t.elapsed() < Duration::from_secs(5) {
                thread::sleep(Duration::from_millis(20));
            }
            if !exists(vf) {
                return Err(format!("VF {vf} (from config space) is not in sysfs"));
            }
        }
        let down = bus.set_vfs(addr, 0).map_err(err)?;
        println!("bus-set-vfs: {} -> {} VFs", down.previous, down.num_vfs);
        if down.num_vfs != 0 || up.vfs.iter().any(exists) {
            return Err(format!("VFs left after 0: {down:?}"));
        }
        println!("bus-set-vfs: ok");
        Ok(())
    }

    fn bus_d3hot(addr: PciAddress) -> Res {
        use pcibus::bus::{BusEvent, DeviceBacking, FaultReason, RegisterIo};

        pcibus::vfio::fault::install().map_err(err)?;
        let mut bus = test_bus(addr)?;
        for r in bus.probe_all() {
            r.result.map_err(|e| e.to_string())?;
        }
        let power = || {
            std::fs::read_to_string(format!("{SYS}/bus/pci/devices/{addr}/power_state"))
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|e| format!("({e})"))
        };
        // The PM capability (ID 01) in the capability list.
        let (pm, csts) = {
            let (backing, bar) = bus
                .device_state::<TestNvme>(addr)
                .ok_or("the driver holds nothing")?;
            let byte = |off: u64| -> Res<u8> {
                let mut b = [0u8; 1];
                backing.read_config(off, &mut b).map_err(err)?;
                Ok(b[0])
            };
            let mut at = u64::from(byte(0x34)?);
            let mut pm = None;
            for _ in 0..48 {
                if at < 0x40 {
                    break;
                }
                if byte(at)? == 0x01 {
                    pm = Some(at);
                    break;
                }
                at = u64::from(byte(at + 1)?);
            }
            let pm = pm.ok_or("no PM capability")?;
            let mut pmcsr = [0u8; 2];
            backing.read_config(pm + 4, &mut pmcsr).map_err(err)?;
            let d3 = (u16::from_le_bytes(pmcsr) & !3) | 3;
            println!(
                "bus-d3hot: PM capability at {pm:#x}, power_state {} before",
                power()
            );
            backing.write_config(pm + 4, &d3.to_le_bytes()).map_err(err)?;
            println!("bus-d3hot: PMCSR written D3hot; power_state {}", power());
            // A register read with the BARs not decoding: SIGBUS, all-ones.
            let csts = RegisterIo::read32(bar, 0x1c).map_err(err)?;
            (pm, csts)
        };
        println!("bus-d3hot: CSTS read {csts:#010x} in D3hot");
        let t = Instant::now();
        let mut fault = None;
        while fault.is_none() && t.elapsed() < Duration::from_secs(10) {
            for event in bus.wait(None, Duration::from_millis(200)).map_err(err)? {
                println!("bus-d3hot: +{}: {event}", ms(t.elapsed()));
                match event {
                    BusEvent::Fault(r) => fault = Some(r.fault.reason),
                    BusEvent::Removed(r) => return Err(format!("taken back as a removal: {}", r.cause)),
                    _ => {}
                }
            }
        }
        let held = bus.held().len();
        // Back to D0 before the bus gives the device back.
        {
            let (backing, _) = bus
                .device_state::<TestNvme>(addr)
                .ok_or("the driver holds nothing")?;
            let mut pmcsr = [0u8; 2];
            backing.read_config(pm + 4, &mut pmcsr).map_err(err)?;
            let d0 = u16::from_le_bytes(pmcsr) & !3;
            backing.write_config(pm + 4, &d0.to_le_bytes()).map_err(err)?;
        }
        println!("bus-d3hot: back to D0; power_state {}", power());
        drop(bus);
        if csts != u32::MAX {
            return Err(format!("CSTS read {csts:#x} in D3hot, not all-ones"));
        }
        match fault {
            Some(FaultReason::LowPower) if held == 1 => {
                println!("bus-d3hot: a fault (device in D3hot), not a removal; still held");
                Ok(())
            }
            other => Err(format!("fault {other:?}, {held} held")),
        }
    }

    // ----------------------------------------------------------------- kernel-perf

    /// Runs `cmd` (its output to /dev/null) with an inotify watch for opens on every PCI
    /// device's `config`, and prints how many opens there were and of which devices. The
    /// VFS reports every open of a sysfs file, whoever makes it; nothing else in the guest
    /// opens `config` while a test runs this. Unlike the function tracer it patches no
    /// kernel code: under QEMU's multi-threaded TCG, patching sometimes leaves a vCPU
    /// running a stale `int3` (tests/vm/README.md, Kernel notes).
    fn config_opens(cmd: &[&str]) -> Res {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        use std::collections::HashMap;

        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| format!("inotify_init1: {e}"))?;
        let devices = format!("{SYS}/bus/pci/devices");
        let mut watched = HashMap::new();
        for entry in std::fs::read_dir(&devices).map_err(|e| format!("{devices}: {e}"))? {
            let name = entry.map_err(|e| format!("{devices}: {e}"))?.file_name();
            let path = Path::new(&devices).join(&name).join("config");
            let wd = inotify
                .add_watch(&path, AddWatchFlags::IN_OPEN)
                .map_err(|e| format!("inotify_add_watch {}: {e}", path.display()))?;
            watched.insert(wd, name.to_string_lossy().into_owned());
        }
        let status = Command::new(cmd[0])
            .args(&cmd[1..])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .map_err(|e| format!("{}: {e}", cmd[0]))?;
        let mut opens: Vec<String> = Vec::new();
        loop {
            match inotify.read_events() {
                Ok(events) if !events.is_empty() => opens.extend(events.iter().map(|ev| {
                    if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                        "(queue overflow)".to_owned()
                    } else {
                        watched
                            .get(&ev.wd)
                            .cloned()
                            .unwrap_or_else(|| "(unknown watch)".into())
                    }
                })),
                Ok(_) | Err(nix::errno::Errno::EAGAIN) => break,
                Err(e) => return Err(format!("reading inotify events: {e}")),
            }
        }
        let devices: BTreeSet<&str> = opens.iter().map(String::as_str).collect();
        let command = cmd.join(" ");
        println!(
            "config opens by '{command}': {} ({} watched){}{}",
            opens.len(),
            watched.len(),
            if devices.is_empty() { "" } else { ": " },
            devices.into_iter().collect::<Vec<_>>().join(" ")
        );
        if !status.success() {
            return Err(format!("'{command}' exited with {status}"));
        }
        Ok(())
    }

    /// The kernel driver's baseline for `pcibus nvme perf --rw randread --bs 4k`: `qd`
    /// threads, each with one 4 KiB O_DIRECT pread in flight at random aligned offsets of
    /// `dev`, for `secs` seconds. Prints one JSON line (iops, mean latency).
    fn kernel_perf(dev: &str, qd: usize, secs: f64) -> Res {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_DIRECT)
            .open(dev)
            .map_err(|e| format!("{dev}: {e}"))?;
        let size = file.metadata().map_err(err)?.len();
        let size = if size == 0 {
            // A block device's metadata says 0: seek to the end instead.
            use std::io::Seek;
            (&file).seek(std::io::SeekFrom::End(0)).map_err(err)?
        } else {
            size
        };
        let blocks = size / 4096;
        if blocks == 0 {
            return Err(format!("{dev}: too small"));
        }
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        let (ios, lat_ns) = thread::scope(|s| {
            let handles: Vec<_> = (0..qd.max(1))
                .map(|t| {
                    let file = &file;
                    s.spawn(move || {
                        // An aligned 4 KiB window of a larger Vec: O_DIRECT wants alignment.
                        let mut raw = vec![0u8; 8192];
                        let at = raw.as_ptr().align_offset(4096);
                        let buf = &mut raw[at..at + 4096];
                        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t as u64 + 1);
                        let (mut n, mut lat) = (0u64, 0u64);
                        while Instant::now() < deadline {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            let t0 = Instant::now();
                            if file.read_exact_at(buf, (x % blocks) * 4096).is_err() {
                                break;
                            }
                            lat += t0.elapsed().as_nanos() as u64;
                            n += 1;
                        }
                        (n, lat)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or((0, 0)))
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
        });
        println!(
            "{{\"qd\":{qd},\"ios\":{ios},\"iops\":{:.0},\"mean_us\":{:.1}}}",
            ios as f64 / secs,
            if ios == 0 {
                0.0
            } else {
                lat_ns as f64 / ios as f64 / 1000.0
            }
        );
        Ok(())
    }
}
