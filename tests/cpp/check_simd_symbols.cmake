# ODR guard for the SIMD paths: each kernels_*.cpp object compiled with wide flags may export
# only its table accessor. Any other external or weak symbol (an inline function, a template
# instance) could be merged by the linker with a baseline copy and run AVX code on a CPU
# without it. Usage: cmake -DNM=<nm> -DOBJECTS=<a;b;...> -P check_simd_symbols.cmake
set(bad "")
foreach(object IN LISTS OBJECTS)
  execute_process(COMMAND ${NM} -C --defined-only --extern-only ${object}
                  OUTPUT_VARIABLE listing RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "nm failed on ${object}")
  endif()
  string(REPLACE "\n" ";" lines "${listing}")
  foreach(line IN LISTS lines)
    if(line STREQUAL "")
      continue()
    endif()
    # Sanitizer instrumentation adds its own registration symbols; they are not our code.
    if(line MATCHES "zeroshard::cpu::(scalar|avx2|avx512)_kernels\\(\\)$" OR
       line MATCHES " (__asan|__odr_asan|___asan|__ubsan|__sancov)")
      continue()
    endif()
    string(APPEND bad "  ${object}: ${line}\n")
  endforeach()
endforeach()
if(bad)
  message(FATAL_ERROR "SIMD objects export symbols other than their table accessor:\n${bad}")
endif()
list(LENGTH OBJECTS count)
message(STATUS "${count} SIMD objects export only their table accessor")
