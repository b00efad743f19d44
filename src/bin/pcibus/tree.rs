//! `pcibus list --tree`: the topology as lspci -t draws it.
//!
//! Parents come from sysfs: `bus/pci/devices/ADDR` links to the device's directory, which
//! is inside its parent bridge's (`devices/pci0000:00/0000:00:01.0/0000:01:00.0`). A device
//! whose directory's parent is not a device (a `pciDDDD:BB` root, or a flat tree that
//! records no nesting) hangs from the root bus of its own domain and bus. A bridge's
//! secondary bus is its `pci_bus/DDDD:BB` entry, else its children's bus; lspci's
//! `[secondary-subordinate]` ranges are shown as the secondary bus only (the subordinate
//! number is in config space, which `list` does not read).

use std::collections::BTreeMap;

use super::*;

/// One device and where it hangs.
pub(super) struct Node {
    pub address: PciAddress,
    /// The bridge whose directory holds this device's, when it is in the scan.
    pub parent: Option<PciAddress>,
    /// The bus behind it, for a bridge.
    pub secondary: Option<u8>,
}

/// The topology of `devices` (sorted by address, as scans are).
pub(super) fn topology(root: &SysfsRoot, devices: &[DeviceRecord]) -> Vec<Node> {
    let known: std::collections::BTreeSet<PciAddress> = devices.iter().map(|d| d.address).collect();
    devices
        .iter()
        .map(|d| {
            let dir = root.device_dir(d.address);
            let real = std::fs::canonicalize(&dir).unwrap_or(dir.clone());
            let parent = real
                .parent()
                .and_then(|p| p.file_name())
                .and_then(|n| n.to_str())
                .and_then(|n| PciAddress::parse_strict(n).ok())
                .filter(|p| known.contains(p));
            let secondary = std::fs::read_dir(real.join("pci_bus")).ok().and_then(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter_map(|n| u8::from_str_radix(n.rsplit_once(':')?.1, 16).ok())
                    .min()
            });
            Node {
                address: d.address,
                parent,
                secondary,
            }
        })
        .collect()
}

/// Draws the tree. `selected` says which devices -s/-d select: a device is drawn when it
/// or a device below it is selected (so the paths to the selected devices are drawn), and
/// the branch characters stay those of the whole tree, as lspci's do.
pub(super) fn write_tree(
    out: &mut impl Write,
    nodes: &[Node],
    selected: &dyn Fn(PciAddress) -> bool,
) -> io::Result<()> {
    let mut children: BTreeMap<PciAddress, Vec<usize>> = BTreeMap::new();
    // Root buses by (domain, bus), listed from the highest, as lspci lists its host buses.
    let mut roots: BTreeMap<(u32, u8), Vec<usize>> = BTreeMap::new();
    for (i, n) in nodes.iter().enumerate() {
        match n.parent {
            Some(p) => children.entry(p).or_default().push(i),
            None => roots
                .entry((n.address.domain(), n.address.bus()))
                .or_default()
                .push(i),
        }
    }
    let t = Tree {
        nodes,
        children,
        selected,
    };
    let roots: Vec<_> = roots
        .into_iter()
        .rev()
        .filter(|(_, devs)| devs.iter().any(|&i| t.wanted(i)))
        .collect();
    let mut line = String::from("-");
    match roots.as_slice() {
        [] => {}
        [((domain, bus), devs)] => {
            line.push_str(&format!("[{domain:04x}:{bus:02x}]-"));
            t.bus(out, devs, &mut line)?;
        }
        _ => {
            let last = roots.len() - 1;
            for (k, ((domain, bus), devs)) in roots.iter().enumerate() {
                let mut l = line.clone();
                l.push_str(&format!(
                    "{}-[{domain:04x}:{bus:02x}]-",
                    if k == last { '\\' } else { '+' }
                ));
                t.bus(out, devs, &mut l)?;
                // Printing blanked it: the prefix carries on as `|` and spaces.
                line = l[..line.len()].to_owned();
            }
        }
    }
    Ok(())
}

struct Tree<'a> {
    nodes: &'a [Node],
    children: BTreeMap<PciAddress, Vec<usize>>,
    selected: &'a dyn Fn(PciAddress) -> bool,
}

/// What stays of a printed line for the next one: `|` where a branch continues.
fn blank(line: &str) -> String {
    line.chars()
        .map(|c| if c == '+' || c == '|' { '|' } else { ' ' })
        .collect()
}

impl Tree<'_> {
    fn kids(&self, i: usize) -> &[usize] {
        self.children
            .get(&self.nodes[i].address)
            .map_or(&[], Vec::as_slice)
    }

    /// The device or one below it is selected.
    fn wanted(&self, i: usize) -> bool {
        (self.selected)(self.nodes[i].address) || self.kids(i).iter().any(|&k| self.wanted(k))
    }

    /// Prints `line` and leaves its continuation in it.
    fn print(&self, out: &mut impl Write, line: &mut String) -> io::Result<()> {
        writeln!(out, "{line}")?;
        *line = blank(line);
        Ok(())
    }

    /// The devices of one bus after `line`.
    fn bus(&self, out: &mut impl Write, devs: &[usize], line: &mut String) -> io::Result<()> {
        match devs {
            [] => self.print(out, line),
            [only] => {
                let keep = line.len();
                line.push_str("--");
                if self.wanted(*only) {
                    self.dev(out, *only, line)?;
                }
                line.truncate(keep);
                Ok(())
            }
            _ => {
                let keep = line.len();
                for (k, &d) in devs.iter().enumerate() {
                    line.truncate(keep);
                    line.push_str(if k + 1 == devs.len() { "\\-" } else { "+-" });
                    if self.wanted(d) {
                        self.dev(out, d, line)?;
                    }
                    // The printed line's prefix, blanked, carries on.
                }
                line.truncate(keep);
                Ok(())
            }
        }
    }

    fn dev(&self, out: &mut impl Write, i: usize, line: &mut String) -> io::Result<()> {
        let n = &self.nodes[i];
        line.push_str(&format!("{:02x}.{:x}", n.address.device(), n.address.function()));
        let kids = self.kids(i);
        let secondary = n
            .secondary
            .or_else(|| kids.first().map(|&k| self.nodes[k].address.bus()));
        match secondary {
            Some(bus) => {
                line.push_str(&format!("-[{bus:02x}]--"));
                self.bus(out, kids, line)
            }
            None => self.print(out, line),
        }
    }
}
