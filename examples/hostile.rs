//! Builds the hostile tree of the "done when" criteria and keeps it on disk: lock-taking
//! attributes that never answer (FIFOs), garbage files, junk names, link loops, a vanished
//! device, a multi-megabyte attribute, functions whose `config` never answers (as during a
//! reset that does not end), beside well-formed devices:
//! `cargo run --example hostile --features testing` prints its root.
use pcibus::testing::{FakeSysfs, Synthetic};

fn main() {
    let fake = FakeSysfs::new().expect("temp dir");
    Synthetic::new(256).build(&fake).expect("generate");
    for (i, attr) in ["uevent", "driver_override", "sriov_numvfs", "sriov_vf_total_msix"]
        .iter()
        .enumerate()
    {
        for d in 0..8 {
            let name = format!("0000:f0:{:02x}.{i}", d);
            fake.device(&name)
                .sriov_totalvfs(2)
                .fifo(attr)
                .create()
                .expect("device");
        }
    }
    // A function being reset forever: a read of its config waits.
    for d in 0..4 {
        fake.device(&format!("0000:f2:{d:02x}.0"))
            .fifo("config")
            .create()
            .expect("resetting");
    }
    fake.device("0000:f1:00.0")
        .without("config")
        .attr("modalias", b"junk\n".to_vec())
        .attr("vendor", b"zz\n".to_vec())
        .create()
        .expect("garbage");
    fake.device("0000:f1:01.0")
        .resource_text(vec![b'0'; 8 << 20])
        .create()
        .expect("huge");
    fake.device("0000:f1:02.0").create().expect("vanishing");
    fake.remove_device("0000:f1:02.0").expect("vanish");
    fake.junk_file("README", b"junk").expect("junk");
    fake.junk_file("0000:f1:03.0", b"a file named like a device")
        .expect("junk");
    fake.link_loop("0000:f1:04.0").expect("loop");
    println!("{}", fake.root().display());
    std::mem::forget(fake);
}
