//! One JSON schema: the output of `list`, `show`, `claims` and `watch` (`--json`) is checked
//! against schema/pcibus-v1.schema.json, which is strict (`additionalProperties: false`,
//! every key required), and the values follow one representation per kind.

#[path = "common/cli.rs"]
mod cli;
use cli::pcibus;
#[path = "common/json_schema.rs"]
mod json_schema;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pcibus::bus::claim::{ClaimDir, ClaimInfo};
use pcibus::bus::map::{Change, DeviceMap};
use pcibus::hotplug::event::{Action, Uevent};
use pcibus::json::{MapChange, NamedRecord, Resync, WatchEvent};
use pcibus::names::{Names, find_pci_ids};
use pcibus::testing::FakeSysfs;
use pcibus::{PciAddress, Scanner, SysfsRoot};
use serde_json::{Value, json};

use json_schema::{check, check_def};

fn schema() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schema/pcibus-v1.schema.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pcifix"))
        .collect();
    v.sort();
    assert!(v.len() >= 4, "{v:?}");
    v
}

// Standard output as JSON; exit 0 or 3 (printed, some attribute not read).
fn json_of(o: &Output) -> Value {
    assert!(
        matches!(o.status.code(), Some(0 | 3)),
        "exit {:?}, stderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn conforms(name: &str, v: &Value) {
    let errors = check_def(&schema(), name, v);
    assert!(errors.is_empty(), "{name}: {errors:#?}\n{v:#}");
}

fn addr(s: &str) -> PciAddress {
    s.parse().unwrap()
}

#[test]
fn the_checker_rejects_what_the_schema_forbids() {
    let root = json!({
        "$defs": {
            "hex": {"type": "string", "pattern": "^[0-9a-f]{4}$"},
            "thing": {
                "type": "object",
                "properties": {
                    "id": {"$ref": "#/$defs/hex"},
                    "n": {"type": ["integer", "null"]},
                    "kind": {"enum": ["a", "b"]},
                    "list": {"type": "array", "items": {"type": "boolean"}},
                    "opt": {"oneOf": [{"$ref": "#/$defs/hex"}, {"type": "null"}]},
                    "map": {"type": "object", "additionalProperties": {"type": "string"}},
                    "one": {"const": true}
                },
                "required": ["id", "n"],
                "additionalProperties": false
            }
        }
    });
    let good = json!({"id": "8086", "n": null, "kind": "a", "list": [true], "opt": "10d3",
                      "map": {"K": "v"}, "one": true});
    assert_eq!(check_def(&root, "thing", &good), Vec::<String>::new());
    for (bad, why) in [
        (json!({"id": "8086", "n": 1, "extra": 0}), "unexpected property"),
        (json!({"id": "8086"}), "missing required"),
        (json!({"id": "808G", "n": 1}), "does not match"),
        (json!({"id": 32902, "n": 1}), "not of type"),
        (json!({"id": "8086", "n": 1.5}), "not of type"),
        (json!({"id": "8086", "n": 1, "kind": "c"}), "not one of"),
        (json!({"id": "8086", "n": 1, "list": [1]}), "not of type"),
        (json!({"id": "8086", "n": 1, "opt": "x"}), "oneOf"),
        (json!({"id": "8086", "n": 1, "map": {"K": 1}}), "not of type"),
        (json!({"id": "8086", "n": 1, "one": false}), "is not true"),
    ] {
        let errors = check_def(&root, "thing", &bad);
        assert!(
            errors.iter().any(|e| e.contains(why)),
            "{bad}: want {why:?}, got {errors:?}"
        );
    }
    // A keyword the checker does not implement is an error, not ignored.
    let errors = check(&root, &json!({"minimum": 3}), &json!(1));
    assert!(errors.iter().any(|e| e.contains("minimum")), "{errors:?}");
    assert!(!check_def(&root, "nothing", &json!(1)).is_empty());
}

#[test]
fn the_schema_is_strict_and_versioned() {
    let s = schema();
    assert_eq!(s["$schema"], "https://json-schema.org/draft/2020-12/schema");
    assert_eq!(s["$id"], pcibus::json::SCHEMA_ID);
    // Every object has exactly its properties, all of them always present (null when
    // unknown): a field added to a record without a schema update fails these tests.
    fn objects<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
        match v {
            Value::Object(o) => {
                if o.get("type") == Some(&json!("object")) && o.contains_key("properties") {
                    out.push(v);
                }
                o.values().for_each(|x| objects(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| objects(x, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    objects(&s, &mut all);
    assert!(all.len() >= 12, "{}", all.len());
    for o in all {
        assert_eq!(o["additionalProperties"], false, "{o}");
        let props: Vec<&String> = o["properties"].as_object().unwrap().keys().collect();
        let required: Vec<&str> = o["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap())
            .collect();
        assert_eq!(props, required, "{o}");
    }
}

#[test]
fn list_and_show_of_every_fixture_conform() {
    for f in fixtures() {
        let fake = FakeSysfs::from_fixture_file(&f).unwrap();
        for args in [&["list", "--json"][..], &["list", "--json", "--read", "all"]] {
            let v = json_of(&pcibus(fake.root(), args));
            assert!(!v.as_array().unwrap().is_empty(), "{f:?}");
            conforms("list", &v);
            assert!(
                check(&schema(), &schema(), &v).is_empty(),
                "the root schema admits it"
            );
        }
        let all = json_of(&pcibus(fake.root(), &["list", "--json", "--read", "all"]));
        for d in all.as_array().unwrap() {
            let a = d["address"].as_str().unwrap();
            let mut shown = json_of(&pcibus(fake.root(), &["show", a, "--json"]));
            conforms("shown_device", &shown);
            // One representation: `show` has the device exactly as `list --read all`.
            shown.as_object_mut().unwrap().remove("details");
            assert_eq!(&shown, d, "{f:?} {a}");
        }
    }
}

#[test]
fn a_hostile_trees_problems_conform() {
    let fake = FakeSysfs::new().unwrap();
    fake.device("0000:00:03.0")
        .attr("modalias", b"pci:garbage\n".to_vec())
        .attr("vendor", b"garbage".to_vec())
        .without("config")
        .create()
        .unwrap();
    fake.device("0000:00:02.0")
        .fifo("driver_override")
        .create()
        .unwrap();
    let v = json_of(&pcibus(
        fake.root(),
        &["list", "--json", "--read", "all", "--timeout", "100"],
    ));
    conforms("list", &v);
    let kinds: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|d| d["problems"].as_array().unwrap())
        .map(|p| p["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"parse") && kinds.contains(&"timed_out"),
        "{kinds:?}"
    );
    let shown = json_of(&pcibus(fake.root(), &["show", "00:03.0", "--json"]));
    conforms("shown_device", &shown);
    assert!(
        !shown["details"]["problems"].as_array().unwrap().is_empty(),
        "{shown:#}"
    );
}

#[test]
fn values_have_one_representation() {
    let fake = FakeSysfs::from_fixture_file(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qemu-q35-sriov-nvme.pcifix"),
    )
    .unwrap();
    let v = json_of(&pcibus(fake.root(), &["show", "01:00.0", "--json"]));
    assert_eq!(v["address"], "0000:01:00.0");
    assert_eq!(v["vendor"], "1b36");
    assert_eq!(v["device"], "0010");
    assert_eq!(v["subsystem_vendor"], "1af4");
    assert_eq!(v["subsystem_device"], "1100");
    assert_eq!(v["class"], "010802");
    assert_eq!(v["revision"], "02");
    assert_eq!(v["sriov"]["vf_device"], "0010");
    assert_eq!(v["sriov"]["virtfns"], json!(["0000:01:00.1", "0000:01:00.2"]));
    assert_eq!(v["bars"][0]["size"], 16384);
    assert_eq!(v["removal_pending"], false);
    assert_eq!(
        v["details"]["capabilities"][0],
        json!({"id": "11", "offset": 64, "name": "MSI-X"})
    );
    assert_eq!(
        v["details"]["extended_capabilities"][1],
        json!({"id": "0010", "version": 1, "offset": 288, "name": "SR-IOV"})
    );
    assert_eq!(
        v["details"]["current_link"],
        json!({"speed_mts": 2500, "width": 1})
    );
    // The table's class column has the same six digits.
    let out = pcibus(fake.root(), &["list"]);
    let table = String::from_utf8(out.stdout).unwrap();
    let line = table.lines().find(|l| l.starts_with("0000:01:00.0")).unwrap();
    assert!(line.contains(" 1b36:0010 02  010802 "), "{line}");
}

#[test]
fn names_are_those_of_pci_ids_as_lspci_vmm_gives_them() {
    let fake = FakeSysfs::from_fixture_file(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qemu-q35-sriov-nvme.pcifix"),
    )
    .unwrap();
    let v = json_of(&pcibus(fake.root(), &["list", "--json"]));
    let d = v
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["address"] == "0000:01:00.0")
        .unwrap();
    let keys = [
        "vendor_name",
        "device_name",
        "subsystem_vendor_name",
        "subsystem_name",
        "class_name",
        "subclass_name",
        "prog_if_name",
    ];
    let Some(ids) = find_pci_ids() else {
        // No database: every name is null, never missing.
        for k in keys {
            assert_eq!(d[k], Value::Null, "{k}");
        }
        eprintln!("SKIPPED: the names' values (no pci.ids on this system)");
        return;
    };
    // What the library's lookup of the same file says, field by field.
    let record = Scanner::new(SysfsRoot::new(fake.root()))
        .no_claims()
        .allow([addr("0000:01:00.0")])
        .scan()
        .unwrap()
        .devices
        .remove(0);
    let names = Names::lookup_records(&ids, std::slice::from_ref(&record)).unwrap();
    let want = serde_json::to_value(names.of(&record)).unwrap();
    for k in keys {
        assert_eq!(d[k], want[k], "{k}");
    }
    // Every pci.ids since 2012 names these.
    assert_eq!(d["vendor_name"], "Red Hat, Inc.");
    assert_eq!(d["class_name"], "Mass storage controller");
    assert_eq!(d["subclass_name"], "Non-Volatile memory controller");
}

#[test]
fn claims_conform() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = ClaimDir::new(tmp.path());
    let _active = dir
        .claim(
            addr("0000:01:00.0"),
            &ClaimInfo::new().command("cli_json").driver("nvme"),
        )
        .unwrap();
    let releasing = dir
        .claim(
            addr("0000:01:00.2"),
            &ClaimInfo::new().physfn(Some(addr("0000:01:00.0"))),
        )
        .unwrap();
    releasing.mark_releasing("test").unwrap();
    let fake = FakeSysfs::new().unwrap();
    let dir_arg = tmp.path().to_str().unwrap();
    let v = json_of(&pcibus(
        fake.root(),
        &["claims", "--json", "--claim-dir", dir_arg],
    ));
    conforms("claims", &v);
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 2, "{v:#}");
    assert_eq!(list[0]["address"], "0000:01:00.0");
    assert_eq!(list[0]["state"], "active");
    assert_eq!(list[0]["driver"], "nvme");
    assert_eq!(list[0]["pid"], std::process::id());
    assert!(list[0]["since"].is_u64());
    assert_eq!(list[1]["state"], "releasing");
    assert_eq!(list[1]["reason"], "test");
    assert_eq!(list[1]["physfn"], "0000:01:00.0");
    let empty = tempfile::tempdir().unwrap();
    let v = json_of(&pcibus(
        fake.root(),
        &["claims", "--json", "--claim-dir", empty.path().to_str().unwrap()],
    ));
    assert_eq!(v, json!([]));
}

fn event(action: Action, address: PciAddress, driver: Option<&str>) -> Uevent {
    let devpath = format!("/devices/pci0000:00/{address}");
    let mut vars = vec![
        ("ACTION".to_string(), action.as_str().to_string()),
        ("DEVPATH".to_string(), devpath.clone()),
        ("SUBSYSTEM".to_string(), "pci".to_string()),
        ("PCI_SLOT_NAME".to_string(), address.to_string()),
    ];
    if let Some(d) = driver {
        vars.push(("DRIVER".to_string(), d.to_string()));
    }
    vars.push(("SEQNUM".to_string(), "7".to_string()));
    Uevent::from_vars(action, devpath, vars).unwrap()
}

// `watch --json` serializes these library values; the kernel's events cannot be made
// without root, so the lines are built here from a fake tree and a device map.
#[test]
fn watch_lines_conform() {
    let fake = FakeSysfs::new().unwrap();
    fake.device("0000:00:01.0").vendor(0x1b36).create().unwrap();
    let mut map = DeviceMap::new(Scanner::new(SysfsRoot::new(fake.root())).no_claims()).unwrap();
    let names = Names::default();
    let b = addr("0000:00:02.0");
    fake.device("0000:00:02.0").create().unwrap();
    for (ev, want) in [
        (event(Action::Add, b, None), Change::Added(b)),
        (
            event(Action::Remove, addr("0000:00:01.0"), None),
            Change::Removed(addr("0000:00:01.0")),
        ),
    ] {
        let change = map.apply(&ev).unwrap();
        assert_eq!(change, want);
        let device = change
            .address()
            .and_then(|a| map.get(a))
            .filter(|_| matches!(change, Change::Added(_)))
            .map(|r| NamedRecord::new(r, &names));
        let line = serde_json::to_value(WatchEvent {
            event: &ev,
            map: Some(MapChange { change, device }),
        })
        .unwrap();
        conforms("watch_line", &line);
        conforms("watch_event", &line);
        assert_eq!(line["address"], ev.pci_address().unwrap().to_string());
        assert_eq!(line["seqnum"], 7);
        assert_eq!(line["vars"]["SUBSYSTEM"], "pci");
        assert_eq!(line["map"]["change"], change.kind());
    }
    let no_map = serde_json::to_value(WatchEvent {
        event: &event(Action::Change, b, Some("nvme")),
        map: None,
    })
    .unwrap();
    conforms("watch_line", &no_map);
    fake.device("0000:00:03.0").create().unwrap();
    let changes = map.resync().unwrap();
    assert!(!changes.is_empty());
    let resync = Resync {
        resync: changes
            .iter()
            .map(|c| MapChange {
                change: *c,
                device: c
                    .address()
                    .and_then(|a| map.get(a))
                    .map(|r| NamedRecord::new(r, &names)),
            })
            .collect(),
    };
    let line = serde_json::to_value(&resync).unwrap();
    conforms("watch_line", &line);
    conforms("watch_resync", &line);
    let added: Vec<&Value> = line["resync"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["device"]["address"])
        .collect();
    assert!(added.contains(&&json!("0000:00:03.0")), "{line:#}");
}

// The real thing, where this process may write a uevent (root): one line of `watch
// --json` for a non-PCI event conforms.
#[test]
fn a_real_watch_line_conforms() {
    use std::io::{BufRead, BufReader};
    use std::time::Duration;
    let trigger = Path::new("/sys/devices/virtual/mem/zero/uevent");
    if std::fs::OpenOptions::new().write(true).open(trigger).is_err() {
        eprintln!("SKIPPED: cannot write {} (not root?)", trigger.display());
        return;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_pcibus"))
        .args(["watch", "--json", "--all"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = None;
    for _ in 0..50 {
        std::fs::write(trigger, "change 5e1f0a7c-0000-4000-8000-00000000c11b").unwrap();
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            seen = Some(line);
            break;
        }
    }
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let _ = child.wait();
    let Some(line) = seen else {
        eprintln!("SKIPPED: no uevent reached `pcibus watch` (none delivered in this namespace?)");
        return;
    };
    let v: Value = serde_json::from_str(&line).unwrap();
    conforms("watch_line", &v);
    assert_eq!(v["map"]["change"], "not_pci");
    assert_eq!(v["map"]["device"], Value::Null);
}
