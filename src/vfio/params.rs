//! vfio-pci's module parameters that decide what its users can do: `enable_sriov`,
//! without which vfio-pci creates no VFs for a PF it drives.

use std::io;
use std::path::PathBuf;

use crate::sysfs::scan::SysfsRoot;

/// vfio-pci's `enable_sriov` parameter, under the sysfs root.
pub const ENABLE_SRIOV: &str = "module/vfio_pci/parameters/enable_sriov";

/// Why vfio-pci will not create VFs for a PF it drives, or the parameter could not be
/// read or set.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ParamError {
    /// The parameter could not be read (vfio-pci not loaded, or too old to have it).
    #[error("cannot read {}: {source} (is vfio-pci loaded? modprobe vfio-pci enable_sriov=1)", path.display())]
    Read {
        /// The parameter's file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The parameter is off and was not to be changed.
    #[error(
        "vfio-pci's enable_sriov is {value}: vfio-pci creates no VFs for a PF it drives unless it is Y \
         (echo Y > {})",
        path.display()
    )]
    Off {
        /// The parameter's file.
        path: PathBuf,
        /// What it says.
        value: String,
    },
    /// Setting it failed (a refusal for lack of permission says what it needs).
    #[error(
        "cannot write Y to {}: {source}{}",
        path.display(),
        crate::sysfs::bind::permission_hint(path, source).map(|h| format!(" ({h})")).unwrap_or_default()
    )]
    Write {
        /// The parameter's file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Makes sure vfio-pci creates VFs for the PFs it drives: `Ok(false)` when
/// `enable_sriov` is Y already; with `set`, writes Y and returns `Ok(true)`; without,
/// [`ParamError::Off`]. Setting it is a system-wide choice (vfio-pci then lets any
/// user of a PF create VFs that a token-holding process can open), hence the flag.
pub fn enable_sriov(root: &SysfsRoot, set: bool) -> Result<bool, ParamError> {
    let path = root.path().join(ENABLE_SRIOV);
    let value = std::fs::read_to_string(&path).map_err(|source| ParamError::Read {
        path: path.clone(),
        source,
    })?;
    let value = value.trim();
    if value == "Y" {
        return Ok(false);
    }
    if !set {
        return Err(ParamError::Off {
            path,
            value: value.to_owned(),
        });
    }
    std::fs::write(&path, "Y").map_err(|source| ParamError::Write { path, source })?;
    log::info!("vfio-pci's enable_sriov set to Y");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_write_says_what_it_needs() {
        let path = PathBuf::from("/sys").join(ENABLE_SRIOV);
        let e = ParamError::Write {
            path: path.clone(),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        };
        let text = e.to_string();
        assert!(
            text.contains(&format!("needs root (or write access to {})", path.display())),
            "{text}"
        );
        let e = ParamError::Write {
            path,
            source: io::Error::from(io::ErrorKind::InvalidInput),
        };
        assert!(!e.to_string().contains("needs root"), "{e}");
    }

    #[test]
    fn checks_then_sets_the_parameter() {
        let tmp = tempfile::tempdir().unwrap();
        let root = SysfsRoot::new(tmp.path());
        let err = enable_sriov(&root, true).unwrap_err();
        assert!(matches!(err, ParamError::Read { .. }), "{err}");
        assert!(err.to_string().contains("modprobe vfio-pci"), "{err}");
        let path = tmp.path().join(ENABLE_SRIOV);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "N\n").unwrap();
        let err = enable_sriov(&root, false).unwrap_err();
        assert!(
            matches!(&err, ParamError::Off { value, .. } if value == "N"),
            "{err}"
        );
        // Checking changes nothing.
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "N\n");
        assert!(enable_sriov(&root, true).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "Y");
        assert!(!enable_sriov(&root, false).unwrap());
    }
}
