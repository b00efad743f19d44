/* rte_errno is a per-lcore (thread-local) C variable, which stable Rust cannot declare as an
 * extern; this setter is the library's only C code. Not exported (abi/version.map's
 * "local: *"). */
#include <rte_errno.h>

void pcibus_dpdk_set_rte_errno(int value)
{
	rte_errno = value;
}
