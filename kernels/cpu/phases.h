// Where a fused decode step's time goes: per-thread cycle counters of its phases (projections, attention, the
// waits at the barriers between them), compiled in only for the profiling build of the kernels
// (-DHF_FASTINFER_PHASES: benchmarks/profile_decode.py). In the normal build HF_PHASE is nothing.
//
// Each mark adds the cycles since the thread's previous mark to the phase that just ended, so a phase's
// counter is the time between the mark before it and its own. The counters are plain per-thread slots (each
// thread writes only its own), read between calls.
#pragma once

#include <cstdint>

namespace hf_fastinfer {
namespace phases {

enum Phase : int {
  kKvWrite, kWaitKvWrite, kAttention, kWaitAttention, kO, kWaitO, kNorm, kGateUp, kWaitGateUp, kDown, kWaitDown,
  kQkv, kWaitQkv, kRope, kWaitLayer, kWaitHead, kHead, kArgs, kSetup, kOutputs, kCount
};
// the names benchmarks/profile_decode.py prints, in Phase order
constexpr const char* kNames[kCount] = {
  "kv write", "wait: kv write", "attention", "wait: attention", "o_proj", "wait: o_proj", "residual + norm",
  "gate/up + act", "wait: gate/up", "down + residual", "wait: down", "q/k/v", "wait: q/k/v", "q/k norm + rotary",
  "wait: next layer", "wait: head", "head (final norm + output projection)",
  "before the region: argument checks", "before the region: buffers",
  "after the region: outputs"};
constexpr int kMaxThreads = 64;

}  // namespace phases
}  // namespace hf_fastinfer

#ifdef HF_FASTINFER_PHASES
#include <x86intrin.h>

namespace hf_fastinfer {
namespace phases {

extern uint64_t counters[kMaxThreads][kCount];
extern thread_local uint64_t last;

inline void start() { last = __rdtsc(); }
inline void mark(int tid, Phase phase) {
  const uint64_t now = __rdtsc();
  if (last != 0 && tid < kMaxThreads) counters[tid][phase] += now - last;
  last = now;
}
inline void stop() { last = 0; }

}  // namespace phases
}  // namespace hf_fastinfer

#define HF_PHASE_START() ::hf_fastinfer::phases::start()
#define HF_PHASE(tid, phase) ::hf_fastinfer::phases::mark(tid, ::hf_fastinfer::phases::phase)
#define HF_PHASE_STOP() ::hf_fastinfer::phases::stop()
#else
#define HF_PHASE_START() ((void)0)
#define HF_PHASE(tid, phase) ((void)0)
#define HF_PHASE_STOP() ((void)0)
#endif
