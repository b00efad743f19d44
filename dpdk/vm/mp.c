/*
 * DPDK multi-process on two NICs (issue 18, secondary processes): one program, run twice
 * with the same --file-prefix, once as the primary and once as a secondary.
 *
 *   pcibus-dpdk-mp EAL-ARGS... --proc-type=primary   -- primary   STATEDIR
 *   pcibus-dpdk-mp EAL-ARGS... --proc-type=secondary -- secondary STATEDIR
 *
 * The primary configures both ports (one RX and one TX queue each, a shared mbuf pool
 * named "mp_pool"), starts them, prints each port's BAR0 address and creates
 * STATEDIR/primary-ready; then it waits for STATEDIR/secondary-done (at most 120 s).
 *
 * The secondary probes the same ports (its bus maps the BARs at the primary's addresses:
 * the PMD's rings and register pointers live in EAL's shared memory), prints each port's
 * BAR0 address, writes a value into a receive-address register of port 0 that nothing
 * uses (RAL[15], its RAH left without the valid bit) and reads it back, sends FRAMES
 * broadcast frames of its own ether type on port 0's queue and receives them on port 1's
 * queue (the two NICs share one QEMU hub), reads both ports' statistics, cleans up (its
 * bus unmaps its own view of the BARs) and exits; the test then creates
 * STATEDIR/secondary-done (whatever the secondary's fate).
 *
 * The primary then reads RAL[15] of port 0 through its own mapping (the secondary's value
 * must be there), sends and receives FRAMES frames itself (its mapping, Bus Master and
 * rings must have survived the secondary's exit), prints the statistics and exits.
 *
 * Each step prints one "mp: ..." line that tests/vm/guest/dpdk-secondary.sh reads. Exit
 * status: 0 done, 2 EAL init failed, 3 fewer than two ports, 4 a port or pool set-up
 * failed, 5 the primary saw no secondary finish.
 *
 * Built by dpdk/vm/guest-tree against Debian's DPDK (pkg-config libdpdk) and the driver
 * SDK headers of the DPDK source package (dpdk/fetch-sdk), like seed.c.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <rte_eal.h>
#include <rte_ethdev.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>

#include <bus_pci_driver.h>

#define FRAMES 256
#define ETHER_TYPE 0x88b5 /* IEEE local experimental */
#define RAL15 (0x5400 + 8 * 15)
#define SECONDARY_VALUE 0x5ec0dab1u
#define POOL "mp_pool"

static volatile uint32_t *bar0(uint16_t port)
{
	struct rte_eth_dev_info info;

	if (rte_eth_dev_info_get(port, &info) != 0 || info.device == NULL)
		return NULL;
	return (volatile uint32_t *)RTE_DEV_TO_PCI(info.device)->mem_resource[0].addr;
}

static void print_ports(const char *who)
{
	uint16_t p;

	RTE_ETH_FOREACH_DEV(p) {
		struct rte_eth_dev_info info;
		const char *name = "?";

		if (rte_eth_dev_info_get(p, &info) == 0 && info.device != NULL)
			name = rte_dev_name(info.device);
		printf("mp: %s port %u %s bar0 %p\n", who, p, name, (void *)bar0(p));
	}
}

static int touch(const char *dir, const char *name)
{
	char path[512];
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	f = fopen(path, "w");
	if (f == NULL)
		return -1;
	fclose(f);
	return 0;
}

static int exists(const char *dir, const char *name)
{
	char path[512];
	struct stat st;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	return stat(path, &st) == 0;
}

/* FRAMES frames out of port 0's queue 0 and into port 1's queue 0: how many of ours came
 * in (gives up after a bounded number of empty polls). */
static unsigned send_and_receive(struct rte_mempool *pool, const char *who)
{
	struct rte_mbuf *tx[FRAMES], *rx[32];
	unsigned sent = 0, got = 0, idle = 0, i;

	if (rte_pktmbuf_alloc_bulk(pool, tx, FRAMES) != 0) {
		printf("mp: %s: cannot allocate %d mbufs\n", who, FRAMES);
		return 0;
	}
	for (i = 0; i < FRAMES; i++) {
		uint8_t *d = (uint8_t *)rte_pktmbuf_append(tx[i], 60);

		memset(d, 0, 60);
		memset(d, 0xff, 6);
		d[6] = 0x02;
		d[11] = 0x01;
		d[12] = ETHER_TYPE >> 8;
		d[13] = ETHER_TYPE & 0xff;
		d[14] = i & 0xff;
	}
	while (sent < FRAMES && idle < 100000) {
		uint16_t n = rte_eth_tx_burst(0, 0, tx + sent, FRAMES - sent);

		sent += n;
		idle = n ? 0 : idle + 1;
	}
	if (sent < FRAMES)
		rte_pktmbuf_free_bulk(tx + sent, FRAMES - sent);
	idle = 0;
	while (got < sent && idle < 2000) {
		uint16_t n = rte_eth_rx_burst(1, 0, rx, 32);

		for (i = 0; i < n; i++) {
			const uint8_t *d = rte_pktmbuf_mtod(rx[i], const uint8_t *);

			if (rx[i]->data_len >= 14 && d[12] == (ETHER_TYPE >> 8) && d[13] == (ETHER_TYPE & 0xff))
				got++;
			rte_pktmbuf_free(rx[i]);
		}
		if (n == 0) {
			idle++;
			usleep(1000);
		} else {
			idle = 0;
		}
	}
	printf("mp: %s sent %u received %u\n", who, sent, got);
	return got;
}

static void print_stats(const char *who)
{
	struct rte_eth_stats s0, s1;

	if (rte_eth_stats_get(0, &s0) != 0 || rte_eth_stats_get(1, &s1) != 0) {
		printf("mp: %s stats unavailable\n", who);
		return;
	}
	printf("mp: %s stats port 0 opackets %" PRIu64 " oerrors %" PRIu64
	       " port 1 ipackets %" PRIu64 " ierrors %" PRIu64 " imissed %" PRIu64 "\n",
	       who, s0.opackets, s0.oerrors, s1.ipackets, s1.ierrors, s1.imissed);
}

static int setup_ports(struct rte_mempool **pool)
{
	uint16_t p;

	*pool = rte_pktmbuf_pool_create(POOL, 4095, 128, 0, RTE_MBUF_DEFAULT_BUF_SIZE, rte_socket_id());
	if (*pool == NULL) {
		printf("mp: primary: cannot create the mbuf pool\n");
		return -1;
	}
	for (p = 0; p < 2; p++) {
		struct rte_eth_conf conf;

		memset(&conf, 0, sizeof(conf));
		if (rte_eth_dev_configure(p, 1, 1, &conf) != 0 ||
		    rte_eth_rx_queue_setup(p, 0, 512, rte_eth_dev_socket_id(p), NULL, *pool) != 0 ||
		    rte_eth_tx_queue_setup(p, 0, 512, rte_eth_dev_socket_id(p), NULL) != 0 ||
		    rte_eth_dev_start(p) != 0) {
			printf("mp: primary: cannot set up port %u\n", p);
			return -1;
		}
		rte_eth_promiscuous_enable(p);
	}
	return 0;
}

int main(int argc, char **argv)
{
	int n = rte_eal_init(argc, argv);
	const char *role, *dir;
	struct rte_mempool *pool;
	volatile uint32_t *regs;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (n < 0) {
		printf("mp: rte_eal_init failed\n");
		return 2;
	}
	argc -= n;
	argv += n;
	if (argc < 3) {
		printf("mp: usage: EAL-ARGS -- primary|secondary STATEDIR\n");
		return 2;
	}
	role = argv[1];
	dir = argv[2];
	printf("mp: %s pid %d: %u ports\n", role, (int)getpid(), rte_eth_dev_count_avail());
	if (rte_eth_dev_count_avail() < 2) {
		rte_eal_cleanup();
		return 3;
	}
	print_ports(role);

	if (strcmp(role, "secondary") == 0) {
		regs = bar0(0);
		pool = rte_mempool_lookup(POOL);
		if (regs == NULL || pool == NULL) {
			printf("mp: secondary: no BAR0 or no pool\n");
			rte_eal_cleanup();
			return 4;
		}
		printf("mp: secondary reads STATUS %#x\n", regs[0x8 / 4]);
		regs[RAL15 / 4] = SECONDARY_VALUE;
		printf("mp: secondary wrote RAL15 %#x, reads back %#x\n", SECONDARY_VALUE, regs[RAL15 / 4]);
		send_and_receive(pool, "secondary");
		print_stats("secondary");
		rte_eal_cleanup();
		printf("mp: secondary done\n");
		return 0;
	}

	if (setup_ports(&pool) != 0) {
		rte_eal_cleanup();
		return 4;
	}
	regs = bar0(0);
	regs[RAL15 / 4] = 0;
	printf("mp: primary reads STATUS %#x, RAL15 %#x\n", regs[0x8 / 4], regs[RAL15 / 4]);
	touch(dir, "primary-ready");
	printf("mp: primary ready\n");
	for (n = 0; n < 1200 && !exists(dir, "secondary-done"); n++)
		usleep(100000);
	if (!exists(dir, "secondary-done")) {
		printf("mp: primary: no secondary finished\n");
		rte_eal_cleanup();
		return 5;
	}
	printf("mp: primary reads RAL15 %#x after the secondary\n", regs[RAL15 / 4]);
	regs[RAL15 / 4] = 0;
	send_and_receive(pool, "primary");
	print_stats("primary");
	for (n = 0; n < 2; n++) {
		rte_eth_dev_stop(n);
		rte_eth_dev_close(n);
	}
	rte_eal_cleanup();
	printf("mp: primary done\n");
	return 0;
}
