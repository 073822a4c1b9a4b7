"""Every tunable of numbabn in one place: sizes that trade speed, never results.

Work items and grids depend on the shape and these numbers alone, never on the
machine or the thread count, so changing one changes speed and the order of
float64 sums (within rounding), and gives the same bits on every run after.
"""

# -- CPU: work items (see numbabn._views) ---------------------------------------

# Elements per work item: large enough that per-(channel, tile) partials stay a
# tiny fraction of the data, small enough to share work between threads.
TILE_ELEMENTS = 16384
# Planar items take whole channels until they read runs of at least this many
# adjacent elements, so short rows (7x7 maps) still stream through memory.
RUN_ELEMENTS = 2048
# The planar elementwise passes (which keep no per-channel partials) take whole channels
# of a row until they cover at least this many adjacent elements: 64 KiB of float32 keep the
# prefetchers streaming, where the reductions' shorter runs made those passes 15-30% slower.
ELEMENTWISE_RUN_ELEMENTS = 16384
# Channels-inner items take whole rows, at least this many of them, so that partials
# stay a thirty-second of the data (and a (512, 8192) matrix still makes 4 items).
MIN_POSITIONS = 128
# The channels-inner elementwise passes take ceil(LANE_ELEMENTS / C) adjacent positions
# as one row of lanes, so that the inner loops of narrow rows (C = 16) run longer; rows
# of 256 lanes measured 5-15% slower (their per-lane coefficients crowd the L1 cache).
LANE_ELEMENTS = 128
# Channels and positions per square tile of a copy between layouts (64 x 64 float32
# is 16 KiB a side, well within the first-level cache).
COPY_BLOCK = 64
# Staging arrays (an operand copied into the input's layout) each thread keeps for
# reuse: a new tensor-sized array costs its first writes a page fault per 4 KiB,
# 2-3 ms for 25.7 MB on two cores, about as much as the copy itself.
STAGING_ARRAYS_KEPT = 2
# Below this many elements one thread does everything in one kernel call: on two
# cores that beat a parallel launch up to about 200 Ki elements.
PARALLEL_MIN_ELEMENTS = 1 << 17

# -- CUDA: blocks and grids (compiled into the kernels) ---------------------------

# Threads per block, and the most channels a block covers in the channels-inner layout
# (a warp reads that many neighbouring channels at once).
THREADS = 256
CHANNELS_PER_BLOCK = 32
# Blocks per multiprocessor the data kernels are compiled to fit at once: 4 blocks of
# 256 threads is half of an sm_90 multiprocessor's 64 warps (at most 64 registers a thread).
MIN_BLOCKS_PER_SM = 4
# Rows of at least this many times THREADS values (56 x 56 maps and wider) are walked
# row by row, every thread on its own values of each row: a block passes over a row at
# least this many times, and only the last pass can leave threads idle.
WIDE_ROW_THREADS = 8
# Grids aim at this many blocks, each thread taking between MIN_PER_THREAD and
# MAX_PER_THREAD values: enough blocks to fill a large GPU, enough work per
# thread to amortise the block's reduction.
TARGET_BLOCKS = 2048
MIN_PER_THREAD = 4
MAX_PER_THREAD = 64
# Wide rows are walked row by row, a block taking whole rows, only where that gives at
# least this many blocks: two per multiprocessor of an H100 (132).
MIN_GRID_BLOCKS = 264
# The merge of a reduction's partials in the last block: each thread loads MERGE_LOADS
# partials of its channel at once (one round trip to L2), and grids have few enough chunks
# per channel that it takes at most MAX_MERGE_ROUNDS such rounds (threads then take more
# than MAX_PER_THREAD values where they must).
MERGE_LOADS = 5
MAX_MERGE_ROUNDS = 8

# -- Dask --------------------------------------------------------------------------

# Partial statistics merged per task of numbabn.dask's tree reduction.
SPLIT_EVERY = 8
