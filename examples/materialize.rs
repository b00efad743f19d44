//! Materializes a fixture into a directory that stays (for poking at with lspci or pcibus):
//! `cargo run --example materialize --features testing -- FIXTURE`.
fn main() {
    let path = std::env::args().nth(1).expect("usage: materialize FIXTURE");
    let fake = pcibus::testing::FakeSysfs::from_fixture_file(&path).expect("fixture");
    let keep = fake.root().to_path_buf();
    println!("{}", keep.display());
    // Keep the tree: leak the FakeSysfs so its Drop does not delete it.
    std::mem::forget(fake);
}
