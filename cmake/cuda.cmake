# Decides the CUDA variant and, for it, the architectures and the NCCL headers.
# Outputs: ZEROSHARD_WITH_CUDA (BOOL), ZEROSHARD_VARIANT ("cpu", "cu12", "cu13"),
#          ZEROSHARD_CUDA_ARCHS (string), ZEROSHARD_NCCL_INCLUDE_DIR.
string(TOUPPER "${ZEROSHARD_CUDA}" _zs_cuda_mode)
set(ZEROSHARD_WITH_CUDA OFF)
set(ZEROSHARD_VARIANT "cpu")
set(ZEROSHARD_CUDA_ARCHS "")
set(ZEROSHARD_NCCL_INCLUDE_DIR "")

if(_zs_cuda_mode STREQUAL "OFF")
  return()
endif()

# Remember whether the user chose architectures (cache or the CUDAARCHS environment variable)
# before enable_language(CUDA) fills in the compiler's default.
set(_zs_user_archs OFF)
if(DEFINED CMAKE_CUDA_ARCHITECTURES OR DEFINED ENV{CUDAARCHS})
  set(_zs_user_archs ON)
endif()

include(CheckLanguage)
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
  if(_zs_cuda_mode STREQUAL "ON")
    message(FATAL_ERROR "ZEROSHARD_CUDA=ON but no CUDA compiler was found: put nvcc on PATH or "
                        "set CMAKE_CUDA_COMPILER")
  endif()
  message(STATUS "zeroshard: no CUDA compiler found, building the CPU variant")
  return()
endif()

enable_language(CUDA)
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
# Static cudart: the extension imports on machines with no driver; libcuda is opened lazily.
set(CMAKE_CUDA_RUNTIME_LIBRARY Static)
find_package(CUDAToolkit REQUIRED)

# Default architectures by toolkit: native code for Ampere and Hopper (and Blackwell where the
# toolkit knows it), plus PTX of the newest for cards that come later. A user setting wins.
# The defaults go into the cache (FORCE): enable_language(CUDA) has cached the compiler's own
# default (sm_75 for nvcc 13), which a re-configure of the same build directory would otherwise
# take for a user's choice.
if(NOT _zs_user_archs)
  if(CMAKE_CUDA_COMPILER_VERSION VERSION_GREATER_EQUAL 12.8)
    set(_zs_default_archs "80-real;90-real;100-real;120")
  else()
    set(_zs_default_archs "80-real;90")
  endif()
  set(CMAKE_CUDA_ARCHITECTURES "${_zs_default_archs}" CACHE STRING "CUDA architectures" FORCE)
endif()
set(ZEROSHARD_CUDA_ARCHS "${CMAKE_CUDA_ARCHITECTURES}")
string(REGEX MATCH "^[0-9]+" _zs_cuda_major "${CMAKE_CUDA_COMPILER_VERSION}")
set(ZEROSHARD_VARIANT "cu${_zs_cuda_major}")

# NCCL headers: NCCL_HOME / NCCL_INCLUDE_DIR, else the nvidia-nccl-cuXX wheel of the Python
# running the build, else the system. The library itself is opened at run time (the one torch
# loaded), so nothing links libnccl here.
find_package(Python3 COMPONENTS Interpreter QUIET)
set(_zs_nccl_hints "")
if(DEFINED ENV{NCCL_HOME})
  list(APPEND _zs_nccl_hints "$ENV{NCCL_HOME}/include")
endif()
if(Python3_Interpreter_FOUND)
  execute_process(
    COMMAND "${Python3_EXECUTABLE}" -c
            "import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], 'include'))"
    OUTPUT_VARIABLE _zs_wheel_nccl OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(_zs_wheel_nccl)
    list(APPEND _zs_nccl_hints "${_zs_wheel_nccl}")
  endif()
endif()
# Search afresh on every configure: the empty normal variable set above would count as "found"
# (CMP0125), and a cached result may name the previous pip build's isolated environment, since
# deleted, which find_path would keep.
unset(ZEROSHARD_NCCL_INCLUDE_DIR)
unset(ZEROSHARD_NCCL_INCLUDE_DIR CACHE)
find_path(ZEROSHARD_NCCL_INCLUDE_DIR nccl.h HINTS ${NCCL_INCLUDE_DIR} ${_zs_nccl_hints}
          PATHS ${CUDAToolkit_INCLUDE_DIRS} /usr/include /usr/local/include)
if(NOT ZEROSHARD_NCCL_INCLUDE_DIR)
  # A plain `pip install .` gets the wheel as a build requirement (pep517/zeroshard_backend.py);
  # this is reached with --no-build-isolation, or a compiler the backend did not see.
  message(FATAL_ERROR "CUDA variant needs nccl.h: pip install nvidia-nccl-cu${_zs_cuda_major} "
                      "into the Python running the build (with --no-build-isolation), or set "
                      "NCCL_HOME / -DNCCL_INCLUDE_DIR=..., or build the CPU variant with "
                      "ZEROSHARD_CUDA=OFF")
endif()
set(ZEROSHARD_WITH_CUDA ON)
message(STATUS "zeroshard: CUDA ${CMAKE_CUDA_COMPILER_VERSION}, archs ${CMAKE_CUDA_ARCHITECTURES}, "
               "nccl.h from ${ZEROSHARD_NCCL_INCLUDE_DIR}")
