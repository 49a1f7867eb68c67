// NcclLibrary: libnccl.so.2 opened at run time and the table of the NCCL functions we call.
// We never link NCCL: one NCCL per process, the one torch already loaded when there is one.
// Only functions present since NCCL 2.18 are resolved. Owns: loading, the function table and
// how an NCCL failure is reported (ZS_NCCL_CHECK).
#pragma once

#include <nccl.h>

#include <string>

namespace zeroshard::gpu::detail {

struct NcclApi {
  decltype(&::ncclGetVersion) get_version;
  decltype(&::ncclGetUniqueId) get_unique_id;
  decltype(&::ncclCommInitRankConfig) comm_init_rank_config;
  decltype(&::ncclCommGetAsyncError) comm_get_async_error;
  decltype(&::ncclCommFinalize) comm_finalize;
  decltype(&::ncclCommAbort) comm_abort;
  decltype(&::ncclCommDestroy) comm_destroy;
  decltype(&::ncclAllReduce) all_reduce;
  decltype(&::ncclReduceScatter) reduce_scatter;
  decltype(&::ncclAllGather) all_gather;
  decltype(&::ncclBroadcast) broadcast;
  decltype(&::ncclSend) send;
  decltype(&::ncclRecv) recv;
  decltype(&::ncclGroupStart) group_start;
  decltype(&::ncclGroupEnd) group_end;
  decltype(&::ncclGetErrorString) get_error_string;
  decltype(&::ncclGetLastError) get_last_error;  // may be null; only enriches messages
  int version = 0;
};

// The loaded table; loads with the default search (an already loaded copy first) if needed.
const NcclApi& nccl_api();

// "<call> failed: <ncclGetErrorString> (<ncclGetLastError>)". Built on the thread that saw the
// failure: NCCL keeps its last-error text per thread.
std::string nccl_error_message(const char* call, ncclResult_t result, ncclComm_t comm);

// "<call> failed: <ncclGetErrorString> (<ncclGetLastError>) [file:line]"
[[noreturn]] void throw_nccl_error(const char* call, ncclResult_t result, ncclComm_t comm,
                                   const char* file, int line);

}  // namespace zeroshard::gpu::detail

// For calls that must succeed outright (not ncclInProgress): group-free, communicator-free ones.
// `name` is the NCCL function's name, for the message.
#define ZS_NCCL_CHECK(name, call, comm)                                                   \
  do {                                                                                    \
    const ncclResult_t zs_nccl_res_ = (call);                                             \
    if (zs_nccl_res_ != ncclSuccess)                                                      \
      ::zeroshard::gpu::detail::throw_nccl_error(name, zs_nccl_res_, (comm), __FILE__, __LINE__); \
  } while (0)
