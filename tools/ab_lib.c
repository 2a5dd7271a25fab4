/* In-process A/B timing of two libbatchnorm builds, or of one build under two settings: loads
 * both with dlopen and alternates their C ABI calls call by call, so that the machine's drift
 * (a VM's neighbours, frequency) hits both alike; prints both medians and their ratio B/A.
 * On a noisy 2-vCPU VM its ratios held within 1-2% from run to run while absolute times moved
 * 30%, where timing each build in its own process did not.
 *
 *   cc -O2 -o ab_lib tools/ab_lib.c -Iinclude -ldl     (from a checkout; or -I<prefix>/include)
 *   ab_lib LIB_A SET_A LIB_B SET_B OP SHAPE LAYOUT DTYPE THREADS REPS SCRUB
 *
 * LIB_A, LIB_B: paths of libbatchnorm.so builds. A build against itself must be two copies
 *   of the file under different names, or the loader hands back the same library twice.
 * SET_A, SET_B: "-", or comma-separated settings applied to the environment before that
 *   library's first call: an ISA level alone (baseline, avx2, avx512, avx512_bf16:
 *   BATCHNORM_ISA) or NAME=VALUE (BATCHNORM_STREAM_BYTES=25165824). The library reads them
 *   once, at its first call.
 * OP: stats, train, inf, bwd, or copy (memcpy of x into the output: the roofline); the fused
 *   ops ftrain, finf (y = relu(bn(x) + r), r a second input array) and fbwd (their gradients:
 *   the ReLU mask from x standing in for y, the residual's gradient into a second output).
 * SHAPE: NxC, or NxCxHxW; LAYOUT: cf (channel axis 1), cl (NHWC memory; NxC: same as cf).
 * DTYPE: f32, bf16, f16. THREADS: bn_set_num_threads. REPS: timed rounds (after 3 warm-ups).
 * SCRUB: 1 writes a 64 MB buffer before each call, so the data come from memory.
 * AB_OFFSET (environment): bytes past a 64-byte boundary for x, dy and the outputs (default 0);
 * AB_OUT_OFFSET: both libraries' outputs (default AB_OFFSET); AB_OUT_OFFSET_B: library B's
 *   output only (default AB_OUT_OFFSET).
 * AB_THREADS_B (environment): library B's thread count (default THREADS), to compare thread
 * counts of one build (two copies of the file; one OpenMP runtime serves both).
 * AB_THP=1 (environment): x, dy and the outputs on transparent huge pages (2 MB aligned,
 * madvise(MADV_HUGEPAGE) before their first write), as NumPy places its large arrays where the
 * kernel's THP mode is `madvise`; by default they are on the 4 KB pages of aligned_alloc, as
 * torch's tensors are. On the 2-vCPU AMD EPYC VM the page kind alone moved a plain read by about
 * 2x (bench/page_walks.c) and the library's ops by up to 2x (bench/torch_pages.py): compare two
 * builds on both kinds.
 *
 * AB_BITS=1 (environment): after the timing, each library runs OP once more on fresh per-channel
 * arrays of its own, and every output is compared byte for byte (y or dx, the residual's gradient,
 * the running statistics, saved mean and invstd, dweight and dbias); the line ends in "bits same",
 * or "bits DIFFER:" and the outputs that differ, with exit status 3. Two settings of one build
 * (ISA levels, BATCHNORM_STREAM_BYTES=0) must compute the same bits; two builds after a change
 * that only moves memory traffic (prefetches, walk order) should.
 *
 * Each library writes its own output buffer, but x (and dy) are shared and the cache is one:
 * a setting that changes how the output leaves the cache (streaming stores) also changes what
 * the other library finds there. Compare store policies in separate processes too. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sys/mman.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "batchnorm/batchnorm.h"

typedef bn_status (*stats_fn)(const DLTensor*, int, DLTensor*, DLTensor*, int64_t*, void*);
typedef bn_status (*train_fn)(const DLTensor*, const DLTensor*, const DLTensor*, DLTensor*, DLTensor*, double,
                              double, int, DLTensor*, DLTensor*, DLTensor*, void*);
typedef bn_status (*inf_fn)(const DLTensor*, const DLTensor*, const DLTensor*, const DLTensor*, const DLTensor*,
                            double, int, DLTensor*, void*);
typedef bn_status (*bwd_fn)(const DLTensor*, const DLTensor*, const DLTensor*, const DLTensor*, const DLTensor*, int,
                            DLTensor*, DLTensor*, DLTensor*, void*);
/* The fused ops' entry points, typed from the header's prototypes. */
typedef __typeof__(bn_forward_training_ex)* train_ex_fn;
typedef __typeof__(bn_forward_inference_ex)* inf_ex_fn;
typedef __typeof__(bn_backward_ex)* bwd_ex_fn;
typedef bn_status (*threads_fn)(int);
typedef const char* (*error_fn)(void);

typedef struct {
  stats_fn stats;
  train_fn train;
  inf_fn inf;
  bwd_fn bwd;
  train_ex_fn train_ex;
  inf_ex_fn inf_ex;
  bwd_ex_fn bwd_ex;
  threads_fn threads;
  error_fn error;
} Lib;

/* One library's arguments: the shared inputs, its own outputs, the per-channel arrays. */
typedef struct {
  DLTensor *x, *dy, *y, *dres, *weight, *bias, *rmean, *rvar, *smean, *sinvstd, *dweight, *dbias;
  const bn_training_options* topt;
  const bn_inference_options* iopt;
  const bn_backward_options* bopt;
} Args;

/* Library k's arguments over the per-channel tensors pc (init_per_channel's order). */
static Args args_for(int k, DLTensor* x, DLTensor* dy, DLTensor* y, DLTensor* dres, DLTensor* pc,
                     const bn_training_options* topt, const bn_inference_options* iopt, const bn_backward_options* bopt) {
  return (Args){x, dy, &y[k], &dres[k], &pc[0], &pc[1], &pc[2], &pc[3], &pc[4], &pc[5], &pc[6], &pc[7],
                topt, iopt, &bopt[k]};
}

/* OP (checked by main) on library L; "copy" copies x into the output. */
static bn_status run(const Lib* L, const char* op, const Args* a, int axis, size_t bytes) {
  if (strcmp(op, "stats") == 0) return L->stats(a->x, axis, a->smean, a->sinvstd, NULL, NULL);
  if (strcmp(op, "train") == 0)
    return L->train(a->x, a->weight, a->bias, a->rmean, a->rvar, 0.1, 1e-5, axis, a->y, a->smean, a->sinvstd, NULL);
  if (strcmp(op, "inf") == 0) return L->inf(a->x, a->rmean, a->rvar, a->weight, a->bias, 1e-5, axis, a->y, NULL);
  if (strcmp(op, "bwd") == 0)
    return L->bwd(a->dy, a->x, a->smean, a->sinvstd, a->weight, axis, a->y, a->dweight, a->dbias, NULL);
  if (strcmp(op, "ftrain") == 0)
    return L->train_ex(a->x, a->weight, a->bias, a->rmean, a->rvar, 0.1, 1e-5, axis, a->topt, a->y, a->smean,
                       a->sinvstd, NULL);
  if (strcmp(op, "finf") == 0)
    return L->inf_ex(a->x, a->rmean, a->rvar, a->weight, a->bias, 1e-5, axis, a->iopt, a->y, NULL);
  if (strcmp(op, "fbwd") == 0)
    return L->bwd_ex(a->dy, a->x, a->smean, a->sinvstd, a->weight, axis, a->bopt, a->y, a->dweight, a->dbias, NULL);
  memcpy(a->y->data, a->x->data, bytes);
  return BN_OK;
}

/* The per-channel arrays' starting values: weight, bias, running mean and var, saved mean and
 * invstd (the backward's inputs), dweight and dbias (outputs). */
static void init_per_channel(float* per[8], int64_t channels) {
  for (int64_t c = 0; c < channels; ++c) {
    per[0][c] = 1.0f + 0.01f * (float)c;
    per[1][c] = 0.1f;
    per[2][c] = 0.0f;
    per[3][c] = 1.0f;
    per[4][c] = 0.01f;
    per[5][c] = 1.5f;
    per[6][c] = per[7][c] = 0.0f;
  }
}

static void die(const char* what, const char* detail) {
  fprintf(stderr, "ab_lib: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
  exit(1);
}

/* The settings "-" or "avx2,BATCHNORM_STREAM_BYTES=0" into the environment, replacing the last
 * library's: every name the last settings set is unset first (not only BATCHNORM_ISA and
 * BATCHNORM_STREAM_BYTES: an experiment's own switch, set for library A, had stayed set for B). */
static void apply_settings(const char* settings) {
  static char last[512];
  for (char* name = strtok(last, ","); name; name = strtok(NULL, ",")) unsetenv(name);
  last[0] = '\0';
  unsetenv("BATCHNORM_ISA");
  unsetenv("BATCHNORM_STREAM_BYTES");
  if (strcmp(settings, "-") == 0) return;
  char buf[512];
  snprintf(buf, sizeof buf, "%s", settings);
  for (char* tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
    char* eq = strchr(tok, '=');
    if (eq) {
      *eq = '\0';
      setenv(tok, eq + 1, 1);
      if (strlen(last) + strlen(tok) + 2 < sizeof last) {
        strcat(last, tok);
        strcat(last, ",");
      }
    } else {
      setenv("BATCHNORM_ISA", tok, 1);
    }
  }
}

/* An array of `bytes` for x, dy or an output (AB_THP: on transparent huge pages). */
static char* array(size_t bytes) {
  static int thp = -1;
  if (thp < 0) thp = getenv("AB_THP") != NULL && strcmp(getenv("AB_THP"), "1") == 0;
  if (!thp) return (char*)aligned_alloc(64, bytes);
  const size_t huge = (size_t)2 << 20, rounded = (bytes + huge - 1) / huge * huge;
  char* p = (char*)aligned_alloc(huge, rounded);
  if (p != NULL) madvise(p, rounded, MADV_HUGEPAGE);
  return p;
}

static void* symbol(void* handle, const char* name) {
  void* p = dlsym(handle, name);
  if (!p) die("missing symbol", name);
  return p;
}

static Lib load(const char* path) {
  void* h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!h) die("cannot load", dlerror());
  Lib l;
  l.stats = (stats_fn)symbol(h, "bn_statistics");
  l.train = (train_fn)symbol(h, "bn_forward_training");
  l.inf = (inf_fn)symbol(h, "bn_forward_inference");
  l.bwd = (bwd_fn)symbol(h, "bn_backward");
  l.train_ex = (train_ex_fn)symbol(h, "bn_forward_training_ex");
  l.inf_ex = (inf_ex_fn)symbol(h, "bn_forward_inference_ex");
  l.bwd_ex = (bwd_ex_fn)symbol(h, "bn_backward_ex");
  l.threads = (threads_fn)symbol(h, "bn_set_num_threads");
  l.error = (error_fn)symbol(h, "bn_last_error");
  return l;
}

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}

static int by_value(const void* a, const void* b) {
  const double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

static DLTensor tensor(void* data, DLDataType dtype, int64_t* shape, int ndim) {
  DLTensor t;
  memset(&t, 0, sizeof t);
  t.data = data;
  t.device.device_type = kDLCPU;
  t.ndim = ndim;
  t.dtype = dtype;
  t.shape = shape;
  return t;
}

/* One value of a half type from a float (bfloat16 truncated, float16 rounded by the conversion:
 * inputs only need to be finite and varied). */
static uint16_t half_bits(float v, int bfloat) {
  if (bfloat) {
    uint32_t b;
    memcpy(&b, &v, 4);
    return (uint16_t)(b >> 16);
  }
  _Float16 h = (_Float16)v;
  uint16_t b;
  memcpy(&b, &h, 2);
  return b;
}

enum { SCRUB_BYTES = 64 << 20 };

int main(int argc, char** argv) {
  if (argc != 12) {
    fprintf(stderr, "usage: ab_lib LIB_A SET_A LIB_B SET_B OP SHAPE LAYOUT DTYPE THREADS REPS SCRUB\n");
    return 2;
  }
  const char* op = argv[5];
  const char* layout = argv[7];
  const char* dname = argv[8];
  const int threads = atoi(argv[9]), reps = atoi(argv[10]), scrub = atoi(argv[11]);
  if (strcmp(op, "stats") && strcmp(op, "train") && strcmp(op, "inf") && strcmp(op, "bwd") && strcmp(op, "copy") &&
      strcmp(op, "ftrain") && strcmp(op, "finf") && strcmp(op, "fbwd"))
    die("OP must be stats, train, inf, bwd, copy, ftrain, finf or fbwd, got", op);
  if (threads < 1 || reps < 1) die("THREADS and REPS must be >= 1", NULL);

  int64_t dims[4];
  int nd = 0;
  for (char* s = argv[6]; *s && nd < 4;) {
    dims[nd++] = strtoll(s, &s, 10);
    if (*s == 'x') ++s;
  }
  if (nd != 2 && nd != 4) die("SHAPE must be NxC or NxCxHxW, got", argv[6]);
  /* The array as passed: NCHW, or NHWC memory with the channel axis last. */
  int64_t shape[4];
  int axis = 1;
  memcpy(shape, dims, sizeof dims);
  if (nd == 4 && strcmp(layout, "cl") == 0) {
    shape[1] = dims[2];
    shape[2] = dims[3];
    shape[3] = dims[1];
    axis = 3;
  }
  const int64_t channels = dims[1];
  int64_t n = 1;
  for (int i = 0; i < nd; ++i) n *= dims[i];

  DLDataType dtype = {kDLFloat, 32, 1};
  size_t item = 4;
  if (strcmp(dname, "bf16") == 0) {
    dtype.code = kDLBfloat;
    dtype.bits = 16;
    item = 2;
  } else if (strcmp(dname, "f16") == 0) {
    dtype.bits = 16;
    item = 2;
  } else if (strcmp(dname, "f32") != 0) {
    die("DTYPE must be f32, bf16 or f16, got", dname);
  }
  const DLDataType f32 = {kDLFloat, 32, 1};

  /* AB_OFFSET=B places x, dy and the outputs B bytes past a 64-byte boundary (16: where NumPy's
   * large arrays and malloc's sit); 0 by default. */
  const char* off_env = getenv("AB_OFFSET");
  const size_t off = off_env ? (size_t)strtoull(off_env, NULL, 10) : 0;
  if (off % item != 0 || off >= 64) die("AB_OFFSET must be a multiple of the item size below 64, got", off_env);
  const size_t bytes = ((size_t)n * item + off + 63) / 64 * 64;
  char* x = array(bytes) + off;
  char* dy = array(bytes) + off;
  /* AB_OUT_OFFSET: both libraries' outputs at another offset than x and dy (NumPy's out= arrays
   * sit at another line offset than its inputs); AB_OUT_OFFSET_B: library B's alone (the same
   * library twice then measures what the output's alignment costs). */
  const char* off_out_env = getenv("AB_OUT_OFFSET");
  const size_t off_out = off_out_env ? (size_t)strtoull(off_out_env, NULL, 10) : off;
  if (off_out % item != 0 || off_out >= 64) die("AB_OUT_OFFSET must be a multiple of the item size below 64, got", off_out_env);
  const char* off_b_env = getenv("AB_OUT_OFFSET_B");
  const size_t off_b = off_b_env ? (size_t)strtoull(off_b_env, NULL, 10) : off_out;
  if (off_b % item != 0 || off_b >= 64) die("AB_OUT_OFFSET_B must be a multiple of the item size below 64, got", off_b_env);
  char* out[2] = {array(bytes + 64) + off_out, array(bytes + 64) + off_b};
  /* The fused backward's second outputs (the residual's gradient), one per library. */
  char* dres[2] = {NULL, NULL};
  if (strcmp(op, "fbwd") == 0)
    for (int k = 0; k < 2; ++k) dres[k] = array(bytes + 64) + (k ? off_b : off_out);
  srand(1);
  for (int64_t i = 0; i < n; ++i) {
    const float v = (float)rand() / (float)RAND_MAX * 2 - 1, g = (float)rand() / (float)RAND_MAX - 0.5f;
    if (item == 4) {
      ((float*)x)[i] = v;
      ((float*)dy)[i] = g;
    } else {
      ((uint16_t*)x)[i] = half_bits(v, dtype.code == kDLBfloat);
      ((uint16_t*)dy)[i] = half_bits(g, dtype.code == kDLBfloat);
    }
  }
  for (int k = 0; k < 2; ++k) {
    memset(out[k], 0, bytes - off); /* the view's n * item bytes */
    if (dres[k]) memset(dres[k], 0, bytes - off);
  }

  /* Per-channel arrays, float32 (the accumulation dtype of every input dtype but float64). */
  float* per[8];
  for (int j = 0; j < 8; ++j) per[j] = malloc((size_t)channels * 4);
  init_per_channel(per, channels);
  int64_t cshape[1] = {channels};
  DLTensor X = tensor(x, dtype, shape, nd), DY = tensor(dy, dtype, shape, nd);
  DLTensor Y[2] = {tensor(out[0], dtype, shape, nd), tensor(out[1], dtype, shape, nd)};
  DLTensor DRES[2] = {tensor(dres[0], dtype, shape, nd), tensor(dres[1], dtype, shape, nd)};
  /* The fused ops: dy's array as the residual, x's as the forward's output y of the ReLU mask. */
  bn_training_options topt = BN_TRAINING_OPTIONS_INIT;
  bn_inference_options iopt = BN_INFERENCE_OPTIONS_INIT;
  bn_backward_options bopt[2] = {BN_BACKWARD_OPTIONS_INIT, BN_BACKWARD_OPTIONS_INIT};
  topt.residual = iopt.residual = &DY;
  topt.activation = iopt.activation = BN_ACTIVATION_RELU;
  for (int k = 0; k < 2; ++k) {
    bopt[k].y = &X;
    bopt[k].dresidual_out = &DRES[k];
    bopt[k].activation = BN_ACTIVATION_RELU;
  }
  DLTensor pc[8];  /* weight, bias, running mean and var, saved mean and invstd, dweight, dbias */
  for (int j = 0; j < 8; ++j) pc[j] = tensor(per[j], f32, cshape, 1);
  Args args[2];
  for (int k = 0; k < 2; ++k) args[k] = args_for(k, &X, &DY, Y, DRES, pc, &topt, &iopt, bopt);

  /* Each library loaded, configured and called once before the other is loaded: it reads its
   * settings at that first call. */
  Lib lib[2];
  const char* threads_b_env = getenv("AB_THREADS_B");
  const int threads_b = threads_b_env ? atoi(threads_b_env) : threads;
  if (threads_b < 1) die("AB_THREADS_B must be >= 1, got", threads_b_env);
  for (int k = 0; k < 2; ++k) {
    apply_settings(argv[2 + 2 * k]);
    lib[k] = load(argv[1 + 2 * k]);
    if (lib[k].threads(k ? threads_b : threads) != BN_OK ||
        run(&lib[k], "inf", &args[k], axis, (size_t)n * item) != BN_OK)
      die(k ? "library B" : "library A", lib[k].error());
  }

  char* scrubber = scrub ? malloc(SCRUB_BYTES) : NULL;
  if (scrubber) memset(scrubber, 1, SCRUB_BYTES);
  double* ms[2] = {malloc(sizeof(double) * reps), malloc(sizeof(double) * reps)};
  for (int r = -3; r < reps; ++r) {
    for (int i = 0; i < 2; ++i) {
      const int k = (r & 1) ? 1 - i : i; /* which goes first alternates */
      if (scrubber)
        for (size_t b = 0; b < SCRUB_BYTES; b += 64) scrubber[b]++;
      const double t0 = now_ms();
      const bn_status st = run(&lib[k], op, &args[k], axis, (size_t)n * item);
      const double t1 = now_ms();
      if (st != BN_OK) die(k ? "library B" : "library A", lib[k].error());
      if (r >= 0) ms[k][r] = t1 - t0;
    }
    /* The statistics the backward reads stay those of x: training overwrote them. */
    if (strcmp(op, "bwd") == 0 || strcmp(op, "fbwd") == 0) init_per_channel(per, channels);
  }
  qsort(ms[0], reps, sizeof(double), by_value);
  qsort(ms[1], reps, sizeof(double), by_value);
  const double a = ms[0][reps / 2], b = ms[1][reps / 2];
  printf("%-5s %-14s %s %-4s T=%d  A %.4f ms  B %.4f ms  B/A %.3f", op, argv[6], layout, dname, threads, a, b,
         b / a);
  const char* bits_env = getenv("AB_BITS");
  if (!bits_env || strcmp(bits_env, "1") != 0) {
    printf("\n");
    return 0;
  }
  /* Each library once more, on per-channel arrays of its own; then every output compared. */
  float* own[2][8];
  DLTensor opc[2][8];
  for (int k = 0; k < 2; ++k) {
    for (int j = 0; j < 8; ++j) own[k][j] = malloc((size_t)channels * 4);
    init_per_channel(own[k], channels);
    for (int j = 0; j < 8; ++j) opc[k][j] = tensor(own[k][j], f32, cshape, 1);
    const Args fresh = args_for(k, &X, &DY, Y, DRES, opc[k], &topt, &iopt, bopt);
    if (run(&lib[k], op, &fresh, axis, (size_t)n * item) != BN_OK) die(k ? "library B" : "library A", lib[k].error());
  }
  /* The outputs: y (not written by stats), the residual's gradient (fbwd), per-channel 2..7. */
  const struct {
    const char* name;
    const void *a, *b;
    size_t bytes;
  } outputs[8] = {{"y", out[0], out[1], strcmp(op, "stats") ? (size_t)n * item : 0},
                  {"dresidual", dres[0], dres[1], dres[0] ? (size_t)n * item : 0},
                  {"running_mean", own[0][2], own[1][2], (size_t)channels * 4},
                  {"running_var", own[0][3], own[1][3], (size_t)channels * 4},
                  {"saved_mean", own[0][4], own[1][4], (size_t)channels * 4},
                  {"saved_invstd", own[0][5], own[1][5], (size_t)channels * 4},
                  {"dweight", own[0][6], own[1][6], (size_t)channels * 4},
                  {"dbias", own[0][7], own[1][7], (size_t)channels * 4}};
  int same = 1;
  for (int j = 0; j < 8; ++j)
    if (outputs[j].bytes && memcmp(outputs[j].a, outputs[j].b, outputs[j].bytes) != 0) {
      printf("%s %s", same ? "  bits DIFFER:" : ",", outputs[j].name);
      same = 0;
    }
  printf("%s\n", same ? "  bits same" : "");
  return same ? 0 : 3;
}
