/* Times the PCI bus scan of whichever librte_bus_pci.so.23 the dynamic linker picks
 * (Debian's stock library, or the pcibus drop-in through LD_LIBRARY_PATH), over the sysfs
 * tree SYSFS_PCI_DEVICES names. Run by dpdk/bench/scan-time; see BENCHMARKS.md.
 *
 *   pcibus-dpdk-scan-bench RESCANS [EAL options...]
 *
 * Prints one line: the wall time of rte_eal_init (the first scan, the IOVA decision and the
 * probe of every PMD against every device), the number of devices the bus lists, then the
 * wall time of each of RESCANS calls of the "pci" bus's own scan operation (every device's
 * attributes read again) and their median. Linked against librte_bus_pci (no symbol used)
 * so that DT_NEEDED loads the library under test before EAL loads its plugins. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <rte_bus.h>
#include <rte_eal.h>
#include <bus_driver.h>

static double now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* find_device's comparator: counts every device, matches none. */
static int count_device(const struct rte_device *dev, const void *data)
{
	(void)dev;
	++*(int *)(uintptr_t)data;
	return 1;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return fprintf(stderr, "usage: %s RESCANS [EAL options...]\n", argv[0]), 2;
	int rescans = atoi(argv[1]);
	if (rescans < 1 || rescans > 1000)
		return fprintf(stderr, "RESCANS must be 1..1000, got '%s'\n", argv[1]), 2;
	argv[1] = argv[0];

	double t0 = now_ms();
	if (rte_eal_init(argc - 1, argv + 1) < 0)
		return fprintf(stderr, "bench: rte_eal_init failed\n"), 1;
	double init = now_ms() - t0;

	struct rte_bus *bus = rte_bus_find_by_name("pci");
	if (bus == NULL || bus->scan == NULL || bus->find_device == NULL)
		return fprintf(stderr, "bench: no bus \"pci\"\n"), 1;
	int devices = 0;
	bus->find_device(NULL, count_device, &devices);

	double *t = calloc(rescans, sizeof(*t));
	if (t == NULL)
		return 1;
	for (int i = 0; i < rescans; i++) {
		double s = now_ms();
		int rc = bus->scan();
		t[i] = now_ms() - s;
		if (rc != 0)
			return fprintf(stderr, "bench: scan returned %d\n", rc), 1;
	}
	int after = 0;
	bus->find_device(NULL, count_device, &after);
	printf("init_ms=%.1f devices=%d devices_after=%d rescan_ms=", init, devices, after);
	for (int i = 0; i < rescans; i++)
		printf("%s%.2f", i ? "," : "", t[i]);
	qsort(t, rescans, sizeof(*t), cmp_double);
	printf(" rescan_median_ms=%.2f\n", t[rescans / 2]);
	fflush(stdout);
	rte_eal_cleanup();
	return 0;
}
