#!/usr/bin/env bash
# ---- EDIT the resources below; one Dask worker runs on each node, the scheduler and the
# ---- ntkdist client run next to the worker on the first node.
#SBATCH --job-name=ntkdist
#SBATCH --nodes=1                 # EDIT: nodes = Dask workers (one worker per node)
#SBATCH --ntasks-per-node=1       # keep 1: one worker process per node
#SBATCH --cpus-per-task=4         # EDIT: cores per node = threads of its worker
#SBATCH --mem=16G                 # EDIT: memory per node (the worker gets ~80 %, see below)
#SBATCH --time=04:00:00           # EDIT: wall time
#SBATCH --output=ntkdist-%j.out   # the job's log, in the submit folder
##SBATCH --partition=debug        # EDIT: uncomment to pick a partition
##SBATCH --gres=gpu:1             # GPU workers: uncomment, and submit with NTKDIST_GPU=1
#
# scripts/sbatch-sweep.sh: a Slurm batch job for an ntkdist sweep in which one allocation
# holds everything: a Dask scheduler and the ntkdist client on the first node, one Dask
# worker per node (srun), all found through a scheduler file in the job's working folder
# (which must be on a file system every node sees). Submit from the repository:
#
#   sbatch scripts/sbatch-sweep.sh
#   sbatch --export=ALL,STUDY=benchmarks/studies/x.toml,OUT=results/x scripts/sbatch-sweep.sh
#
# Variables (pass with --export=ALL,NAME=value):
#   STUDY               the study file      (default benchmarks/studies/paper-small.toml)
#   OUT                 the study's folder  (default results/sweep; a rerun resumes it)
#   NTKDIST_PYTHON_ENV  the venv to source  (default .venv; "none": use the PATH as is)
#   NTKDIST_GPU=1       GPU workers: `dask cuda worker` (dask-cuda) and `--device gpu`
#   WORKER_MEMORY       each worker's memory limit (default 80 % of the job's memory per
#                       node, the rest left to the scheduler and the client; "auto" if unknown)
#   NTKDIST_INTERFACE   network interface for scheduler and workers, e.g. ib0 (default: any)
# The job ends by shutting the workers and the scheduler down, also on failure or scancel.
# shellcheck disable=SC2317  # cleanup and stop_child run from traps
set -euo pipefail

STUDY=${STUDY:-benchmarks/studies/paper-small.toml}
OUT=${OUT:-results/sweep}
NTKDIST_PYTHON_ENV=${NTKDIST_PYTHON_ENV:-.venv}
NTKDIST_GPU=${NTKDIST_GPU:-0}
NNODES=${SLURM_NNODES:-1}
CPUS=${SLURM_CPUS_PER_TASK:-1}
JOB=${SLURM_JOB_ID:-$$}
SCHED="$PWD/.ntkdist-scheduler-$JOB.json"   # the job's working folder (sbatch --chdir)
LOCALDIR=${TMPDIR:-/tmp}

if [[ $NTKDIST_PYTHON_ENV != none ]]; then
    if [[ ! -f $NTKDIST_PYTHON_ENV/bin/activate ]]; then
        echo "sbatch-sweep: no venv at $NTKDIST_PYTHON_ENV (set NTKDIST_PYTHON_ENV)" >&2
        exit 2
    fi
    # shellcheck disable=SC1091
    source "$NTKDIST_PYTHON_ENV/bin/activate"
fi

# Each worker runs CPUS tasks at once, one thread each: keep BLAS/numba single-threaded.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1

# Worker memory: ~80 % of the memory Slurm gives the job on each node.
if [[ -z ${WORKER_MEMORY:-} ]]; then
    if [[ -n ${SLURM_MEM_PER_NODE:-} ]]; then
        WORKER_MEMORY="$((SLURM_MEM_PER_NODE * 8 / 10))MB"
    elif [[ -n ${SLURM_MEM_PER_CPU:-} ]]; then
        WORKER_MEMORY="$((SLURM_MEM_PER_CPU * CPUS * 8 / 10))MB"
    else
        WORKER_MEMORY=auto
    fi
fi

IFACE=()
[[ -n ${NTKDIST_INTERFACE:-} ]] && IFACE=(--interface "$NTKDIST_INTERFACE")

SCHED_PID="" WORKER_PID="" CLIENT_PID=""

# stop_child PID SECONDS: give a process this script started SECONDS to end by itself, then
# SIGTERM it (SIGKILL 15 s later) and reap it.
stop_child() {
    local pid=$1 i
    [[ -n $pid ]] || return 0
    for ((i = 0; i < 2 * $2; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 30; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# On exit (success, failure, scancel or the time limit): stop the client if it still runs,
# then the workers (SIGTERM to the srun step's processes, which ends the step), then the
# scheduler (SIGTERM: it closes gracefully), and remove the scheduler file.
cleanup() {
    local rc=$? step
    trap - EXIT INT TERM
    [[ -n $CLIENT_PID ]] && stop_child "$CLIENT_PID" 0
    if [[ -n $WORKER_PID && -n ${SLURM_JOB_ID:-} ]]; then
        # SIGTERM to the worker step's processes: each nanny and its worker close cleanly
        # (SIGTERM to srun itself would SIGKILL the step; retiring workers through the
        # scheduler makes the nanny log a spurious traceback; SIGINT makes the worker exit 1).
        # Slurm logs this as "STEP N.0 ... CANCELLED": expected.
        for step in $(squeue -h -s -j "$SLURM_JOB_ID" -o '%i' 2>/dev/null \
            | grep -E "^$SLURM_JOB_ID\.[0-9]+\$" || true); do
            scancel --signal=TERM "$step" 2>/dev/null || true
        done
    fi
    stop_child "$WORKER_PID" 30
    stop_child "$SCHED_PID" 0
    rm -f "$SCHED"
    echo "sbatch-sweep: done (exit $rc) $(date -Is)"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

echo "sbatch-sweep: job $JOB on ${SLURM_JOB_NODELIST:-$(hostname)}: $NNODES worker(s)," \
    "$CPUS thread(s) and $WORKER_MEMORY each; study $STUDY -> $OUT"

# 1. The scheduler, here on the first node; random ports so jobs can share a node.
rm -f "$SCHED"
dask scheduler --scheduler-file "$SCHED" --port 0 --dashboard-address :0 "${IFACE[@]}" \
    </dev/null &
SCHED_PID=$!
for i in $(seq 1 120); do
    [[ -s $SCHED ]] && break
    kill -0 "$SCHED_PID" 2>/dev/null || { echo "sbatch-sweep: the scheduler exited" >&2; exit 2; }
    sleep 0.5
done
[[ -s $SCHED ]] || { echo "sbatch-sweep: no scheduler file after 60 s" >&2; exit 2; }

# 2. One worker per node, as one job step in the background.
if [[ $NTKDIST_GPU == 1 ]]; then
    WORKER=(dask cuda worker --scheduler-file "$SCHED" --local-directory "$LOCALDIR"
        "${IFACE[@]}")
    DEVICE=(--device gpu)
else
    WORKER=(dask worker --scheduler-file "$SCHED" --nworkers 1 --nthreads "$CPUS"
        --memory-limit "$WORKER_MEMORY" --local-directory "$LOCALDIR" "${IFACE[@]}")
    DEVICE=()
fi
srun --overlap --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="$CPUS" --kill-on-bad-exit=0 \
    "${WORKER[@]}" </dev/null &
WORKER_PID=$!

# 3. Wait until every worker has joined (the run is planned for the workers it sees).
timeout 300 python -c 'import sys; from distributed import Client
with Client(scheduler_file=sys.argv[1], timeout="30s") as c: c.wait_for_workers(int(sys.argv[2]))' \
    "$SCHED" "$NNODES" || { echo "sbatch-sweep: the $NNODES worker(s) did not join in 300 s" >&2; exit 2; }

# 4. The client: the sweep itself. In the background so that scancel's SIGTERM is caught.
ntkdist sweep "$STUDY" --out "$OUT" --scheduler-file "$SCHED" "${DEVICE[@]}" </dev/null &
CLIENT_PID=$!
set +e
wait "$CLIENT_PID"
rc=$?
set -e
CLIENT_PID=""
exit "$rc"
