// Reuse of freed CPU tensor memory for the span of a nio_fast run.
//
// An NIO iteration allocates and frees the same few hundred tensor sizes every
// time, many of them megabytes. glibc's malloc hands large blocks back to the
// kernel (mmap'd blocks, heap trimming), so the next iteration touches fresh
// pages: 11k-15k page faults and ~10% of an iteration in the kernel on the
// small ViT at D = 4 (2-core CPU), where a training step faults none. Inside a
// span, this allocator keeps each freed block of 16 KB or more in a list by
// page-rounded size and hands it out again for the same size, keeping at most
// twice the most bytes the span had handed out at once; on leaving the
// outermost span every kept block is freed.
//
// It is installed as PyTorch's CPU allocator on the first entry and stays
// installed (passing everything through outside spans): ATen's oneDNN glue
// frees raw blocks through whichever CPU allocator is current, so blocks must
// be freeable by it whichever allocator made them. It is never installed over
// an allocator other than PyTorch's default one.
#pragma once

#include <cstdint>
#include <vector>

namespace nio_fast {

// Enters a span (spans nest; threads share them). False, and nothing done,
// when another CPU allocator than PyTorch's default is installed.
bool cpu_cache_enter();

// Leaves a span entered with cpu_cache_enter; leaving the outermost one frees
// every kept block.
void cpu_cache_exit();

// {depth, kept bytes, bytes handed out now, most bytes handed out at once in
// this span, reuses, fresh allocations} (sizes page-rounded; blocks of 16 KB or
// more handed out inside spans only).
std::vector<int64_t> cpu_cache_stats();

}  // namespace nio_fast
