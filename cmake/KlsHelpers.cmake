# Project-wide compile settings and helpers.

# Warnings for every kls target (host and device code). -Wno-restrict: g++ 12 at -O3 (Release)
# reports a false -Wrestrict inside std::string (GCC bug 105329).
function(kls_target_defaults target)
  set(warn -Wall -Wextra)
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    list(APPEND warn -Wno-restrict)
  endif()
  if(KLS_WERROR)
    list(APPEND warn -Werror)
  endif()
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:${warn}>
    $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra,-Wno-restrict$<$<BOOL:${KLS_WERROR}>:,-Werror> --expt-relaxed-constexpr>)
  if(KLS_ENABLE_ASAN)
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-fsanitize=address,undefined -fno-omit-frame-pointer>)
    target_link_options(${target} PRIVATE -fsanitize=address,undefined)
  endif()
endfunction()

# kls_add_library(NAME SOURCES ... [DEPS ...] [PRIVATE_DEPS ...])
# A static library whose include root is the repository root (#include "engine/model/config.h").
function(kls_add_library name)
  cmake_parse_arguments(ARG "" "" "SOURCES;DEPS;PRIVATE_DEPS" ${ARGN})
  add_library(${name} STATIC ${ARG_SOURCES})
  target_include_directories(${name} PUBLIC ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR})
  target_link_libraries(${name} PUBLIC ${ARG_DEPS} PRIVATE ${ARG_PRIVATE_DEPS})
  kls_target_defaults(${name})
endfunction()

# kls_add_test(NAME SOURCES ... LIBS ... [LABELS ...])
# One GoogleTest binary; its cases are registered with ctest through gtest_discover_tests.
function(kls_add_test name)
  cmake_parse_arguments(ARG "" "" "SOURCES;LIBS;LABELS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE ${ARG_LIBS} GTest::gtest GTest::gmock GTest::gtest_main)
  target_include_directories(${name} PRIVATE ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR})
  kls_target_defaults(${name})
  if(NOT ARG_LABELS)
    set(ARG_LABELS cpu)
  endif()
  # The trees are compiled in (tests/test_util.h SourceDir/BinaryDir; the environment variables
  # KLS_SOURCE_DIR / KLS_BINARY_DIR override them when a bundle runs elsewhere).
  target_compile_definitions(${name} PRIVATE KLS_TEST_SOURCE_DIR="${PROJECT_SOURCE_DIR}"
    KLS_TEST_BINARY_DIR="${PROJECT_BINARY_DIR}")
  gtest_discover_tests(${name} PROPERTIES LABELS "${ARG_LABELS}" DISCOVERY_TIMEOUT 60)
endfunction()

# kls_glob_library(NAME DIR [DEPS ...]): one library from the *.cc files of DIR (tests excluded).
function(kls_glob_library name dir)
  cmake_parse_arguments(ARG "" "" "DEPS;PRIVATE_DEPS" ${ARGN})
  file(GLOB sources CONFIGURE_DEPENDS ${dir}/*.cc)
  list(FILTER sources EXCLUDE REGEX "_test\\.cc$")
  if(NOT sources)
    message(STATUS "kls_glob_library(${name}): no sources in ${dir} yet; skipped")
    return()
  endif()
  kls_add_library(${name} SOURCES ${sources} DEPS ${ARG_DEPS} PRIVATE_DEPS ${ARG_PRIVATE_DEPS})
endfunction()
