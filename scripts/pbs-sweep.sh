#!/usr/bin/env bash
# ---- EDIT the resources below; one Dask worker runs on each node (chunk), the scheduler and
# ---- the ntkdist client run next to the worker on the first node.
#PBS -N ntkdist
#PBS -l select=2:ncpus=8:mem=32gb:mpiprocs=1
#PBS -l place=scatter
#PBS -l walltime=04:00:00
#PBS -j oe
##PBS -q workq
#     select=N:ncpus=C:mem=M  EDIT: N nodes (one worker each) with C cores (its threads) and
#                             M memory; GPU workers: add :ngpus=1 and submit with NTKDIST_GPU=1
#     place=scatter           one chunk per node
#     walltime                EDIT: wall time;  -q: EDIT to pick a queue
#     Torque instead of PBS Pro: replace the select/place lines by
#       #PBS -l nodes=2:ppn=8
#       #PBS -l mem=64gb
#
# scripts/pbs-sweep.sh: a PBS Pro / Torque batch job for an ntkdist sweep in which one
# allocation holds everything: a Dask scheduler and the ntkdist client on the first node, one
# Dask worker per node, all found through a scheduler file in the submit folder ($PBS_O_WORKDIR,
# which must be on a file system every node sees). Submit from the repository:
#
#   qsub scripts/pbs-sweep.sh
#   qsub -v STUDY=benchmarks/studies/x.toml,OUT=results/x scripts/pbs-sweep.sh
#
# Variables (pass with qsub -v NAME=value,...):
#   STUDY               the study file      (default benchmarks/studies/paper-small.toml)
#   OUT                 the study's folder  (default results/sweep; a rerun resumes it)
#   NTKDIST_PYTHON_ENV  the venv to source  (default .venv; "none": use the PATH as is)
#   NTKDIST_GPU=1       GPU workers: `dask cuda worker` (dask-cuda) and `--device gpu`
#   WORKER_MEMORY       each worker's memory limit, e.g. 25GB (default auto: what the node
#                       or its cgroup allows; set it to ~80 % of mem= to leave room for the
#                       scheduler and the client on the first node)
#   NTKDIST_INTERFACE   network interface for scheduler and workers, e.g. ib0 (default: any)
# Workers on the other nodes are started with `pbsdsh -u` (Torque) or `pbsdsh -n INDEX`
# (PBS Pro); with a single node the worker is started directly. At the end the local worker
# and the scheduler are stopped; remote workers close themselves once the scheduler is gone
# (--death-timeout), and PBS ends whatever is left with the job.
# shellcheck disable=SC2317  # cleanup and stop_child run from traps
set -euo pipefail

cd "${PBS_O_WORKDIR:-$PWD}"

STUDY=${STUDY:-benchmarks/studies/paper-small.toml}
OUT=${OUT:-results/sweep}
NTKDIST_PYTHON_ENV=${NTKDIST_PYTHON_ENV:-.venv}
NTKDIST_GPU=${NTKDIST_GPU:-0}
WORKER_MEMORY=${WORKER_MEMORY:-auto}
CPUS=${NCPUS:-${PBS_NUM_PPN:-1}}            # PBS Pro: NCPUS; Torque: PBS_NUM_PPN
JOB=${PBS_JOBID:-$$}
JOB=${JOB%%.*}
SCHED="$PWD/.ntkdist-scheduler-$JOB.json"
WRAPPER="$PWD/.ntkdist-worker-$JOB.sh"
LOCALDIR=${TMPDIR:-/tmp}
THIS_HOST=$(hostname)

# The job's nodes, once each, in the node file's order (the first is this one).
NODES=()
if [[ -n ${PBS_NODEFILE:-} && -r ${PBS_NODEFILE:-} ]]; then
    mapfile -t NODES < <(awk '!seen[$0]++' "$PBS_NODEFILE")
fi
[[ ${#NODES[@]} -gt 0 ]] || NODES=("$THIS_HOST")
NNODES=${#NODES[@]}

if [[ $NTKDIST_PYTHON_ENV != none ]]; then
    if [[ ! -f $NTKDIST_PYTHON_ENV/bin/activate ]]; then
        echo "pbs-sweep: no venv at $NTKDIST_PYTHON_ENV (set NTKDIST_PYTHON_ENV)" >&2
        exit 2
    fi
    NTKDIST_PYTHON_ENV=$(cd "$NTKDIST_PYTHON_ENV" && pwd)
    # shellcheck disable=SC1091
    source "$NTKDIST_PYTHON_ENV/bin/activate"
fi

IFACE=()
[[ -n ${NTKDIST_INTERFACE:-} ]] && IFACE=(--interface "$NTKDIST_INTERFACE")

if [[ $NTKDIST_GPU == 1 ]]; then
    WORKER=(dask cuda worker --scheduler-file "$SCHED" --local-directory "$LOCALDIR"
        --death-timeout 60 "${IFACE[@]}")
    DEVICE=(--device gpu)
else
    WORKER=(dask worker --scheduler-file "$SCHED" --nworkers 1 --nthreads "$CPUS"
        --memory-limit "$WORKER_MEMORY" --local-directory "$LOCALDIR" --death-timeout 60
        "${IFACE[@]}")
    DEVICE=()
fi

SCHED_PID="" CLIENT_PID=""
WORKER_PIDS=()

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

# On exit (success, failure, qdel or the walltime): stop the client if it still runs, the
# worker processes started here (SIGTERM: a nanny and its worker close cleanly), then the
# scheduler (SIGTERM: it closes gracefully); remove the scheduler file and the wrapper.
cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    [[ -n $CLIENT_PID ]] && stop_child "$CLIENT_PID" 0
    for pid in "${WORKER_PIDS[@]}"; do stop_child "$pid" 0; done
    stop_child "$SCHED_PID" 0
    rm -f "$SCHED" "$WRAPPER"
    echo "pbs-sweep: done (exit $rc) $(date -Is)"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# Each worker runs CPUS tasks at once, one thread each: keep BLAS/numba single-threaded.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1

echo "pbs-sweep: job $JOB on ${NODES[*]}: $NNODES worker(s), $CPUS thread(s) and" \
    "$WORKER_MEMORY memory each; study $STUDY -> $OUT"

# 1. The scheduler, here on the first node; random ports so jobs can share a node.
rm -f "$SCHED"
dask scheduler --scheduler-file "$SCHED" --port 0 --dashboard-address :0 "${IFACE[@]}" \
    </dev/null &
SCHED_PID=$!
for _ in $(seq 1 120); do
    [[ -s $SCHED ]] && break
    kill -0 "$SCHED_PID" 2>/dev/null || { echo "pbs-sweep: the scheduler exited" >&2; exit 2; }
    sleep 0.5
done
[[ -s $SCHED ]] || { echo "pbs-sweep: no scheduler file after 60 s" >&2; exit 2; }

# 2. One worker per node. pbsdsh starts programs without this script's environment, so each
#    remote worker runs a small wrapper (on the shared folder) that recreates it.
if [[ $NNODES -eq 1 ]]; then
    "${WORKER[@]}" </dev/null &
    WORKER_PIDS+=($!)
else
    command -v pbsdsh >/dev/null 2>&1 \
        || { echo "pbs-sweep: $NNODES nodes but no pbsdsh to start their workers" >&2; exit 2; }
    {
        echo '#!/usr/bin/env bash'
        echo "cd $(printf '%q' "$PWD")"
        [[ $NTKDIST_PYTHON_ENV != none ]] \
            && echo "source $(printf '%q' "$NTKDIST_PYTHON_ENV/bin/activate")"
        echo 'export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1'
        printf 'exec'
        printf ' %q' "${WORKER[@]}"
        echo ' </dev/null'
    } >"$WRAPPER"
    chmod +x "$WRAPPER"
    if { pbsdsh 2>&1 || true; } | grep -q -- '\[-u\]'; then  # its usage names -u: Torque
        # Torque: -u runs the program once on each node of the job
        pbsdsh -u /bin/bash "$WRAPPER" </dev/null &
        WORKER_PIDS+=($!)
    else
        # PBS Pro: -n INDEX runs it on the node file's INDEX-th entry: the first entry of
        # each node
        for node in "${NODES[@]}"; do
            index=$(awk -v n="$node" '$0 == n {print NR - 1; exit}' "$PBS_NODEFILE")
            pbsdsh -n "$index" -- /bin/bash "$WRAPPER" </dev/null &
            WORKER_PIDS+=($!)
        done
    fi
fi

# 3. Wait until every worker has joined (the run is planned for the workers it sees).
timeout 300 python -c 'import sys; from distributed import Client
with Client(scheduler_file=sys.argv[1], timeout="30s") as c: c.wait_for_workers(int(sys.argv[2]))' \
    "$SCHED" "$NNODES" || { echo "pbs-sweep: the $NNODES worker(s) did not join in 300 s" >&2; exit 2; }

# 4. The client: the sweep itself. In the background so that qdel's SIGTERM is caught.
ntkdist sweep "$STUDY" --out "$OUT" --scheduler-file "$SCHED" "${DEVICE[@]}" </dev/null &
CLIENT_PID=$!
set +e
wait "$CLIENT_PID"
rc=$?
set -e
CLIENT_PID=""
exit "$rc"
