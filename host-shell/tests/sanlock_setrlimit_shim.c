/* Test-only LD_PRELOAD shim for the sanlock daemons of host-shell/tests/sanlock.rs.
 *
 * sanlock refuses to start when it cannot raise RLIMIT_MEMLOCK or
 * RLIMIT_RTPRIO, which needs CAP_SYS_RESOURCE that containers and CI
 * machines lack. This makes setrlimit() succeed for those two and leaves
 * every other limit to the C library. Never use it in production. */
#define _GNU_SOURCE
#include <dlfcn.h>
struct rlimit;
/* Linux: RLIMIT_MEMLOCK 8, RLIMIT_RTPRIO 14. */
static int pretend(int resource) { return resource == 8 || resource == 14; }
int setrlimit(int resource, const struct rlimit *rlim) {
    if (pretend(resource)) return 0;
    int (*real)(int, const struct rlimit *) = (int (*)(int, const struct rlimit *))dlsym(RTLD_NEXT, "setrlimit");
    return real(resource, rlim);
}
