/* A stand-in for the CUDA driver library (libcuda.so.1), for tests on machines without
 * a GPU: only the process checkpoint calls, cuInit and cuDriverGetVersion, with the
 * signatures, struct layouts, states and error codes NVIDIA's driver API documents.
 *
 *   cc -shared -fPIC -o libcuda.so.1 fake_libcuda.c        (all calls, driver 13.0)
 *   cc -shared -fPIC -DNO_CHECKPOINT -o libcuda.so.1 ...    (a pre-r570 driver)
 *
 * State lives in files, one per pid, in $FAKE_LIBCUDA_DIR/<pid>: the state name on the
 * first line ("running", "locked", "checkpointed", "failed"), then the UUIDs of the GPUs
 * the process uses, one a line. A process is a CUDA process when it has such a file (a
 * test seeds one) or holds /dev/nvidiaN or /dev/nvidiactl open (then it starts
 * "running", on the GPUs of $FAKE_LIBCUDA_GPUS, comma-separated). Every call is
 * appended to $FAKE_LIBCUDA_LOG (default $FAKE_LIBCUDA_DIR/calls.log) as one line:
 * "<call> <pid> <result> [detail]".
 *
 * A dir written "@/dev/shm/x" is inside the process's own root and the file is named by
 * its pid in its own pid namespace: the state then moves with the process when CRIU
 * dumps and restores its /dev/shm, as the real state moves with the process's memory.
 *
 * $FAKE_LIBCUDA_VERSION sets cuDriverGetVersion (default 13000: restore takes GPU
 * pairs; below 13000 its args are all reserved), $FAKE_LIBCUDA_INIT the result of
 * cuInit (default 0). The checkpoint calls return CUDA_ERROR_NOT_INITIALIZED before a
 * successful cuInit, CUDA_ERROR_ILLEGAL_STATE from the wrong state, and
 * CUDA_ERROR_INVALID_VALUE for non-zero reserved fields or a GPU map that does not name
 * every GPU of the process.
 */
#include <dirent.h>
#include <sys/stat.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int CUresult;
enum {
    CUDA_SUCCESS = 0, CUDA_ERROR_INVALID_VALUE = 1, CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_INVALID_DEVICE = 101, CUDA_ERROR_ILLEGAL_STATE = 401,
    CUDA_ERROR_NOT_FOUND = 500, CUDA_ERROR_NOT_SUPPORTED = 801,
};
typedef enum {
    CU_PROCESS_STATE_RUNNING = 0, CU_PROCESS_STATE_LOCKED = 1,
    CU_PROCESS_STATE_CHECKPOINTED = 2, CU_PROCESS_STATE_FAILED = 3,
} CUprocessState;

typedef struct { unsigned char bytes[16]; } CUuuid;
typedef struct { unsigned int timeoutMs; unsigned int reserved0; uint64_t reserved1[7]; }
    CUcheckpointLockArgs;
typedef struct { uint64_t reserved[8]; } CUcheckpointCheckpointArgs;
typedef struct { CUuuid oldUuid; CUuuid newUuid; } CUcheckpointGpuPair;
typedef struct {
    CUcheckpointGpuPair *gpuPairs;
    unsigned int gpuPairsCount;
    char reserved[52 - sizeof(CUcheckpointGpuPair *)];
    uint64_t reserved1;
} CUcheckpointRestoreArgs;
typedef struct { uint64_t reserved[8]; } CUcheckpointUnlockArgs;

_Static_assert(sizeof(CUcheckpointLockArgs) == 64, "lock args");
_Static_assert(sizeof(CUcheckpointRestoreArgs) == 64, "restore args");

#ifdef NO_CHECKPOINT
#pragma GCC diagnostic ignored "-Wunused-function"
#endif

#define MAXGPU 16
static const char *NAMES[] = {"running", "locked", "checkpointed", "failed"};
static int initialized;

struct proc { int state; int ngpu; char gpu[MAXGPU][64]; };

static int version(void)
{
    const char *v = getenv("FAKE_LIBCUDA_VERSION");
    return v ? atoi(v) : 13000;
}

static void logcall(const char *call, int pid, CUresult rc, const char *detail)
{
    const char *dir = getenv("FAKE_LIBCUDA_DIR"), *log = getenv("FAKE_LIBCUDA_LOG");
    char path[4096];
    if (log)
        snprintf(path, sizeof path, "%s", log);
    else if (dir && dir[0] != '@')
        snprintf(path, sizeof path, "%s/calls.log", dir);
    else
        return;
    FILE *f = fopen(path, "a");
    if (!f)
        return;
    fprintf(f, "%s %d %d%s%s\n", call, pid, rc, detail && *detail ? " " : "",
            detail ? detail : "");
    fclose(f);
}

static int ns_pid(int pid)
{
    char path[64], line[256];
    int ns = pid;
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return pid;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "NSpid:", 6)) {
            char *last = strrchr(line, '\t');
            ns = atoi(last ? last + 1 : line + 6);
        }
    fclose(f);
    return ns;
}

/* The state file of pid in out; its dir in dirout (created on save). */
static int state_path2(int pid, char *out, size_t n, char *dirout, size_t dn)
{
    const char *dir = getenv("FAKE_LIBCUDA_DIR");
    if (!dir || !*dir)
        return -1;
    if (dir[0] == '@') {
        snprintf(dirout, dn, "/proc/%d/root%s", pid, dir + 1);
        snprintf(out, n, "%s/%d", dirout, ns_pid(pid));
    } else {
        snprintf(dirout, dn, "%s", dir);
        snprintf(out, n, "%s/%d", dir, pid);
    }
    return 0;
}

static int state_path(int pid, char *out, size_t n)
{
    char d[4096];
    return state_path2(pid, out, n, d, sizeof d);
}

static int holds_gpu(int pid)
{
    char fddir[64], link[4096], target[4096];
    struct dirent *e;
    int found = 0;
    snprintf(fddir, sizeof fddir, "/proc/%d/fd", pid);
    DIR *d = opendir(fddir);
    if (!d)
        return 0;
    while (!found && (e = readdir(d))) {
        snprintf(link, sizeof link, "%s/%s", fddir, e->d_name);
        ssize_t len = readlink(link, target, sizeof target - 1);
        if (len <= 0)
            continue;
        target[len] = 0;
        if (!strcmp(target, "/dev/nvidiactl"))
            found = 1;
        else if (!strncmp(target, "/dev/nvidia", 11) && target[11] >= '0' && target[11] <= '9')
            found = 1;
    }
    closedir(d);
    return found;
}

/* CUDA_SUCCESS, or why the pid cannot be asked about. */
static CUresult load(int pid, struct proc *p)
{
    char path[4096], line[128];
    memset(p, 0, sizeof *p);
    if (!initialized)
        return CUDA_ERROR_NOT_INITIALIZED;
    if (pid <= 0)
        return CUDA_ERROR_INVALID_VALUE;
    if (state_path(pid, path, sizeof path))
        return CUDA_ERROR_NOT_SUPPORTED;
    FILE *f = fopen(path, "r");
    if (!f) {
        char proc[64];
        snprintf(proc, sizeof proc, "/proc/%d", pid);
        if (access(proc, F_OK))
            return CUDA_ERROR_NOT_FOUND;
        if (!holds_gpu(pid))
            return CUDA_ERROR_NOT_SUPPORTED;
        const char *gpus = getenv("FAKE_LIBCUDA_GPUS");
        p->state = CU_PROCESS_STATE_RUNNING;
        if (gpus) {
            char buf[1024], *save = NULL, *tok;
            snprintf(buf, sizeof buf, "%s", gpus);
            for (tok = strtok_r(buf, ",", &save); tok && p->ngpu < MAXGPU;
                 tok = strtok_r(NULL, ",", &save))
                snprintf(p->gpu[p->ngpu++], 64, "%s", tok);
        }
        return CUDA_SUCCESS;
    }
    p->state = -1;
    if (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        for (int i = 0; i < 4; i++)
            if (!strcmp(line, NAMES[i]))
                p->state = i;
    }
    while (p->ngpu < MAXGPU && fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        if (*line)
            snprintf(p->gpu[p->ngpu++], 64, "%.63s", line);
    }
    fclose(f);
    return p->state < 0 ? CUDA_ERROR_NOT_SUPPORTED : CUDA_SUCCESS;
}

static void save(int pid, const struct proc *p)
{
    char path[4200], tmp[4300], dir[4096];
    if (state_path2(pid, path, sizeof path, dir, sizeof dir))
        return;
    mkdir(dir, 0755);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f)
        return;
    fprintf(f, "%s\n", NAMES[p->state]);
    for (int i = 0; i < p->ngpu; i++)
        fprintf(f, "%s\n", p->gpu[i]);
    fclose(f);
    rename(tmp, path);
}

static int zero(const void *mem, size_t n)
{
    const unsigned char *b = mem;
    for (size_t i = 0; i < n; i++)
        if (b[i])
            return 0;
    return 1;
}

static void uuid_text(const CUuuid *u, char *out)
{
    static const int dash[] = {4, 6, 8, 10};
    char *o = out + sprintf(out, "GPU-");
    for (int i = 0, k = 0; i < 16; i++) {
        if (k < 4 && i == dash[k]) {
            *o++ = '-';
            k++;
        }
        o += sprintf(o, "%02x", u->bytes[i]);
    }
}

/* One state transition: from `need` to `to`, else CUDA_ERROR_ILLEGAL_STATE. */
static CUresult step(const char *call, int pid, int need, int to, const char *detail)
{
    struct proc p;
    CUresult rc = load(pid, &p);
    if (rc == CUDA_SUCCESS && p.state != need)
        rc = CUDA_ERROR_ILLEGAL_STATE;
    if (rc == CUDA_SUCCESS) {
        p.state = to;
        save(pid, &p);
    }
    logcall(call, pid, rc, detail);
    return rc;
}

CUresult cuInit(unsigned int flags)
{
    const char *v = getenv("FAKE_LIBCUDA_INIT");
    CUresult rc = flags ? CUDA_ERROR_INVALID_VALUE : (v ? atoi(v) : CUDA_SUCCESS);
    if (rc == CUDA_SUCCESS)
        initialized = 1;
    logcall("cuInit", 0, rc, NULL);
    return rc;
}

CUresult cuDriverGetVersion(int *driverVersion)
{
    if (!driverVersion)
        return CUDA_ERROR_INVALID_VALUE;
    *driverVersion = version();
    return CUDA_SUCCESS;
}

#ifndef NO_CHECKPOINT

CUresult cuCheckpointProcessGetState(int pid, CUprocessState *state)
{
    struct proc p;
    CUresult rc = state ? load(pid, &p) : CUDA_ERROR_INVALID_VALUE;
    if (rc == CUDA_SUCCESS)
        *state = (CUprocessState)p.state;
    logcall("cuCheckpointProcessGetState", pid, rc, NULL);
    return rc;
}

CUresult cuCheckpointProcessGetRestoreThreadId(int pid, int *tid)
{
    struct proc p;
    CUresult rc = tid ? load(pid, &p) : CUDA_ERROR_INVALID_VALUE;
    if (rc == CUDA_SUCCESS)
        *tid = pid;
    logcall("cuCheckpointProcessGetRestoreThreadId", pid, rc, NULL);
    return rc;
}

CUresult cuCheckpointProcessLock(int pid, CUcheckpointLockArgs *args)
{
    char detail[64] = "";
    if (args) {
        if (args->reserved0 || !zero(args->reserved1, sizeof args->reserved1)) {
            logcall("cuCheckpointProcessLock", pid, CUDA_ERROR_INVALID_VALUE, "reserved");
            return CUDA_ERROR_INVALID_VALUE;
        }
        snprintf(detail, sizeof detail, "timeoutMs=%u", args->timeoutMs);
    }
    return step("cuCheckpointProcessLock", pid, CU_PROCESS_STATE_RUNNING,
                CU_PROCESS_STATE_LOCKED, detail);
}

CUresult cuCheckpointProcessCheckpoint(int pid, CUcheckpointCheckpointArgs *args)
{
    if (args && !zero(args, sizeof *args)) {
        logcall("cuCheckpointProcessCheckpoint", pid, CUDA_ERROR_INVALID_VALUE, "reserved");
        return CUDA_ERROR_INVALID_VALUE;
    }
    return step("cuCheckpointProcessCheckpoint", pid, CU_PROCESS_STATE_LOCKED,
                CU_PROCESS_STATE_CHECKPOINTED, NULL);
}

CUresult cuCheckpointProcessRestore(int pid, CUcheckpointRestoreArgs *args)
{
    struct proc p;
    char detail[2048] = "", old[64], new_[64];
    size_t used = 0;
    CUresult rc = load(pid, &p);
    if (rc == CUDA_SUCCESS && p.state != CU_PROCESS_STATE_CHECKPOINTED)
        rc = CUDA_ERROR_ILLEGAL_STATE;
    if (rc == CUDA_SUCCESS && args) {
        if (version() < 13000) {
            if (!zero(args, sizeof *args))
                rc = CUDA_ERROR_INVALID_VALUE;          /* all reserved before 13.0 */
        } else if (!zero(args->reserved, sizeof args->reserved) || args->reserved1 ||
                   (args->gpuPairsCount && !args->gpuPairs) ||
                   (!args->gpuPairsCount && args->gpuPairs)) {
            rc = CUDA_ERROR_INVALID_VALUE;
        } else if (args->gpuPairsCount) {
            /* the pairs must name every GPU of the process, each once */
            int mapped[MAXGPU] = {0};
            char moved[MAXGPU][64] = {{0}};
            for (unsigned i = 0; rc == CUDA_SUCCESS && i < args->gpuPairsCount; i++) {
                int hit = -1;
                uuid_text(&args->gpuPairs[i].oldUuid, old);
                uuid_text(&args->gpuPairs[i].newUuid, new_);
                for (int g = 0; g < p.ngpu; g++)
                    if (!strcmp(p.gpu[g], old))
                        hit = g;
                if (hit < 0 || mapped[hit])
                    rc = CUDA_ERROR_INVALID_VALUE;
                else
                    mapped[hit] = 1;
                used += snprintf(detail + used, sizeof detail - used, "%s%s=%s",
                                 i ? "," : "", old, new_);
                if (used >= sizeof detail)
                    used = sizeof detail - 1;
            }
            for (int g = 0; rc == CUDA_SUCCESS && g < p.ngpu; g++)
                if (!mapped[g])
                    rc = CUDA_ERROR_INVALID_VALUE;
            for (int g = 0; rc == CUDA_SUCCESS && g < p.ngpu; g++)
                for (unsigned i = 0; i < args->gpuPairsCount; i++) {
                    uuid_text(&args->gpuPairs[i].oldUuid, old);
                    if (!strcmp(p.gpu[g], old)) {
                        uuid_text(&args->gpuPairs[i].newUuid, new_);
                        snprintf(moved[g], 64, "%s", new_);
                        break;
                    }
                }
            if (rc == CUDA_SUCCESS)
                memcpy(p.gpu, moved, sizeof moved);
        }
    }
    if (rc == CUDA_SUCCESS) {
        p.state = CU_PROCESS_STATE_LOCKED;
        save(pid, &p);
    }
    logcall("cuCheckpointProcessRestore", pid, rc, detail);
    return rc;
}

CUresult cuCheckpointProcessUnlock(int pid, CUcheckpointUnlockArgs *args)
{
    if (args && !zero(args, sizeof *args)) {
        logcall("cuCheckpointProcessUnlock", pid, CUDA_ERROR_INVALID_VALUE, "reserved");
        return CUDA_ERROR_INVALID_VALUE;
    }
    return step("cuCheckpointProcessUnlock", pid, CU_PROCESS_STATE_LOCKED,
                CU_PROCESS_STATE_RUNNING, NULL);
}

#endif
