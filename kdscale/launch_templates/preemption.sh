# --- preemption -------------------------------------------------------------------------------
# SLURM sends USR1 to this batch shell {{signal_seconds}} s before the time limit (--signal=B:USR1@N).
# The job step gets SIGTERM (the trainer saves a checkpoint and exits), then the job requeues
# itself; when it starts again the same command resumes from the checkpoint. A SIGTERM that
# reaches this shell (scancel, preemption by SLURM) is forwarded the same way, without requeue.
STEP_PID=""
on_signal() {
  echo "kdscale: SIG$1 at $(date -Is): stopping the job step (pid ${STEP_PID:-none})" >&2
  local rc=143
  if [[ -n $STEP_PID ]]; then
    kill -TERM "$STEP_PID" 2>/dev/null
    wait "$STEP_PID"
    rc=$?
  fi
  if [[ $1 == USR1 ]]; then
    echo "kdscale: requeueing job $SLURM_JOB_ID (step exited $rc)" >&2
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit "$rc"
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# run_step CMD...: run the job step in the background so that the traps above fire at once.
run_step() {
  "$@" &
  STEP_PID=$!
  wait "$STEP_PID"
  local rc=$?
  STEP_PID=""
  return "$rc"
}
echo "kdscale: job ${SLURM_JOB_ID} on ${SLURM_JOB_NODELIST} (restart ${SLURM_RESTART_COUNT:-0})" >&2
# ----------------------------------------------------------------------------------------------
