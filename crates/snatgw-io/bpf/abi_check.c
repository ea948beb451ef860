/* SPDX-License-Identifier: GPL-2.0-only OR MIT */
/*
 * Prints the layout and values of snat_abi.h, as the C compiler sees them, one item a line
 * (issue #16). build.rs compiles this for the host, runs it and turns the lines into
 * compile-time assertions on the Rust mirror in src/fastpath.rs. Host-only: never part of the
 * BPF object. It walks the header's own lists, so nothing declared there goes unchecked.
 *
 * Lines (space-separated, names are C identifiers):
 *   struct NAME SIZE ALIGN
 *   field STRUCT NAME TYPE OFFSET SIZE
 *   array STRUCT NAME TYPE OFFSET SIZE COUNT   (SIZE: the whole array's)
 *   const NAME VALUE
 *   stat INDEX NAME        (NAME: the entry's name in Rust's STAT_NAMES)
 */
#include <stddef.h>
#include <stdio.h>

#include "snat_abi.h"

#define CONST(name, value) printf("const %s %lld\n", #name, (long long)(name));
#define SLOT(name) printf("const %s %lld\n", #name, (long long)(name));
#define STAT(id, name) printf("stat %d %s\n", (int)(id), #name);
#define FIELD(type, name)                                                                \
	printf("field %s %s %s %zu %zu\n", CUR_NAME, #name, #type, offsetof(CUR, name),  \
	       sizeof(((CUR *)0)->name));
#define ARRAY(type, name, count)                                                         \
	printf("array %s %s %s %zu %zu %lld\n", CUR_NAME, #name, #type, offsetof(CUR, name), \
	       sizeof(((CUR *)0)->name), (long long)(count));
#define STRUCT(name, fields)                                                             \
	{                                                                                \
		typedef struct name CUR;                                                 \
		const char *CUR_NAME = #name;                                            \
		printf("struct %s %zu %zu\n", #name, sizeof(CUR), _Alignof(CUR));        \
		fields(FIELD, ARRAY)                                                     \
	}

int main(void)
{
	SNAT_CONSTANTS(CONST)
	SNAT_CONFIG_SLOTS(SLOT)
	SLOT(CFG_COUNT)
	SNAT_STATS(STAT)
	SLOT(ST_COUNT)
	SNAT_STRUCTS(STRUCT)
	return fflush(stdout) == 0 ? 0 : 1;
}
