# embed_bytes.cmake - write a file's bytes as a C array, at build time:
#
#   cmake -DIN=file.desc -DOUT=file.c -DSYMBOL=name -P embed_bytes.cmake
#
# OUT defines
#   const unsigned char SYMBOL[];   the bytes
#   const size_t SYMBOL_len;        their number
# (used for the descriptor sets of server reflection: rp_descriptor_set in
# the top CMakeLists.txt).  CMake only, no xxd.
if(NOT DEFINED IN OR NOT DEFINED OUT OR NOT DEFINED SYMBOL)
  message(FATAL_ERROR "embed_bytes.cmake: IN, OUT and SYMBOL are needed")
endif()
file(READ "${IN}" hex HEX)
string(LENGTH "${hex}" nhex)
math(EXPR nbytes "${nhex} / 2")
if(nbytes EQUAL 0)
  message(FATAL_ERROR "embed_bytes.cmake: ${IN} is empty")
endif()
# 16 bytes a line, each byte as 0xNN.
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," body "${hex}")
# (CMake's regular expressions have no {n}: spell the 16 out.)
string(REPEAT "0x[0-9a-f][0-9a-f]," 16 line)
string(REGEX REPLACE "(${line})" "\\1\n  " body "${body}")
string(REGEX REPLACE "\n  $" "" body "${body}")
get_filename_component(in_name "${IN}" NAME)
set(text "/* Generated at build time by cmake/embed_bytes.cmake from ${in_name}: do not edit. */
#include <stddef.h>

extern const unsigned char ${SYMBOL}[];
extern const size_t ${SYMBOL}_len;

const unsigned char ${SYMBOL}[${nbytes}] = {
  ${body}
};
const size_t ${SYMBOL}_len = ${nbytes};
")
file(WRITE "${OUT}" "${text}")
