/*
 * The seed deadlock (issue 18), reproduced with DPDK itself: a minimal DPDK 22.11
 * application with a PMD of its own for QEMU's NVMe controller (1b36:0010), written the
 * way SPDK's environment layer drives DPDK's PCI bus:
 *
 *   - the PMD asks for its BARs (RTE_PCI_DRV_NEED_MAPPING) and for removal requests
 *     (RTE_PCI_DRV_INTR_RMV: the bus arms VFIO's request notifier);
 *   - the application registers an RTE_DEV_EVENT_REMOVE callback for the device; the
 *     callback runs in EAL's interrupt thread and only marks the device (the release is
 *     deferred, as SPDK defers it);
 *   - the main thread, before it releases the device, scans the bus (rte_bus_scan(), as
 *     SPDK's enumeration and hotplug poller do), then releases it (rte_dev_remove()).
 *
 * Run it holding the controller (bound to vfio-pci), then start a removal from another
 * process (sysfs "remove", or sriov_numvfs=0 on the PF of a held VF). With Debian's
 * librte_bus_pci the scan reads the device's sriov_numvfs, which waits for the device
 * lock the removal holds while it waits for this process to let go: the scan never
 * returns. With pcibus's drop-in the scan skips the device, returns, and the release lets
 * the removal finish.
 *
 * Usage: pcibus-dpdk-seed EAL-ARGS... (e.g. -l 0 -a 0000:01:00.0 --no-telemetry)
 * Prints one "seed: ..." line per step (the guest test reads them) and exits 0 when the
 * device was probed, the removal request arrived, the scan returned and the release
 * succeeded; 3 if the PMD probed nothing, 2 if EAL failed, 4/5 if the callback or the
 * release failed.
 *
 * Built by dpdk/vm/guest-tree against Debian's DPDK (pkg-config libdpdk) and the driver
 * SDK headers of the DPDK source package (dpdk/fetch-sdk).
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <rte_bus.h>
#include <rte_dev.h>
#include <rte_eal.h>
#include <rte_errno.h>

#include <bus_pci_driver.h>

/* The device the PMD probed (one at most), and a copy of its name. */
static struct rte_pci_device *held;
static char held_name[RTE_DEV_NAME_MAX_LEN];
/* Set by the RTE_DEV_EVENT_REMOVE callback; the main thread acts on it. */
static atomic_int removal_requested;

static int seed_probe(struct rte_pci_driver *drv, struct rte_pci_device *dev)
{
	(void)drv;
	if (held != NULL) {
		printf("seed: probe %s: already holding %s, not taken\n", dev->device.name, held_name);
		return 1;
	}
	printf("seed: probe %s (%04x:%04x) kdrv %d max_vfs %u BAR0 %p (%lu bytes)\n",
	       dev->device.name, dev->id.vendor_id, dev->id.device_id, (int)dev->kdrv,
	       (unsigned)dev->max_vfs, dev->mem_resource[0].addr,
	       (unsigned long)dev->mem_resource[0].len);
	if (dev->mem_resource[0].addr == NULL) {
		printf("seed: probe %s: BAR0 not mapped\n", dev->device.name);
		return -1;
	}
	held = dev;
	snprintf(held_name, sizeof(held_name), "%s", dev->device.name);
	return 0;
}

static int seed_remove(struct rte_pci_device *dev)
{
	printf("seed: remove %s\n", dev->device.name);
	if (dev == held)
		held = NULL;
	return 0;
}

static const struct rte_pci_id seed_ids[] = {
	{RTE_PCI_DEVICE(0x1b36, 0x0010)},
	{.vendor_id = 0},
};

static struct rte_pci_driver seed_driver = {
	.id_table = seed_ids,
	.drv_flags = RTE_PCI_DRV_NEED_MAPPING | RTE_PCI_DRV_INTR_RMV,
	.probe = seed_probe,
	.remove = seed_remove,
};

RTE_PMD_REGISTER_PCI(pcibus_seed, seed_driver);

/* EAL's interrupt thread: note the request, release later (never from here). */
static void on_device_event(const char *name, enum rte_dev_event_type type, void *arg)
{
	(void)arg;
	if (type != RTE_DEV_EVENT_REMOVE)
		return;
	printf("seed: RTE_DEV_EVENT_REMOVE for %s: release deferred\n", name);
	atomic_store(&removal_requested, 1);
}

int main(int argc, char **argv)
{
	struct rte_pci_device *dev;
	int rc;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (rte_eal_init(argc, argv) < 0) {
		printf("seed: rte_eal_init failed: %s\n", rte_strerror(rte_errno));
		return 2;
	}
	if (held == NULL) {
		printf("seed: the seed PMD probed no device\n");
		rte_eal_cleanup();
		return 3;
	}
	dev = held;
	rc = rte_dev_event_callback_register(held_name, on_device_event, NULL);
	if (rc != 0) {
		printf("seed: rte_dev_event_callback_register(%s): %d\n", held_name, rc);
		return 4;
	}
	printf("seed: holding %s; waiting for RTE_DEV_EVENT_REMOVE\n", held_name);
	while (!atomic_load(&removal_requested))
		usleep(10000);

	printf("seed: scan start (rte_bus_scan, release still pending)\n");
	rc = rte_bus_scan();
	printf("seed: scan returned %d\n", rc);

	printf("seed: release %s (rte_dev_remove)\n", held_name);
	rc = rte_dev_remove(&dev->device);
	printf("seed: release returned %d\n", rc);
	rte_dev_event_callback_unregister(held_name, on_device_event, NULL);
	rte_eal_cleanup();
	printf("seed: done\n");
	return rc == 0 ? 0 : 5;
}
