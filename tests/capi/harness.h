/* The test programs' shared runner (C99, also compiled as C++ by capi_cxx.cpp): reads a case
 * written by tests/test_capi.py, calls one bn_ op on DLTensors over the case's raw buffers, and
 * writes every buffer back (<file>.out), so the test can compare outputs with the Python API's
 * and check that a failed call changed nothing.
 *
 * Case file, one item a line:
 *   op NAME | axis INT | eps REAL | momentum REAL | counts K C0 C1 ... | device cpu|cuda
 *   tensor NAME DTYPE FILE BYTE_OFFSET NDIM SHAPE... (STRIDES... | C)
 * and for the *_ex ops' options struct (BN_*_OPTIONS_INIT plus the tensors residual, y and
 * dresidual when listed):
 *   activation INT | reserved INT | options null (pass NULL) | options_size SIZE (struct_size) |
 *   options_extra INT64 (a newer caller's struct: 8 more bytes holding INT64 after the known
 *   members, struct_size counting them)
 * and the training variants' members (1.2; tensors renorm_r and renorm_d: the forward's
 * renorm_r_out / renorm_d_out, the backward's renorm_r / renorm_d):
 *   running_var_biased INT | skip_nonfinite INT | ghost_batch INT64 | renorm RMAX DMAX
 * A tensor not listed is passed as NULL; "C" strides are passed as NULL (C order).
 * Prints "status S", "count N" and "error MESSAGE" lines; exits 0 when the case ran. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <batchnorm/batchnorm.h>

#define HARNESS_MAX_TENSORS 16

typedef struct {
  char name[32];
  char path[1024];
  DLTensor t;
  int64_t shape[16];
  int64_t strides[16];
  void* buffer;
  size_t bytes;
} harness_tensor;

typedef struct {
  char op[32];
  int axis;
  double eps, momentum;
  int32_t device_type; /* of every tensor: kDLCPU unless the case says `device cuda` */
  int64_t num_counts;
  int64_t counts[HARNESS_MAX_TENSORS];
  int num_tensors;
  harness_tensor tensors[HARNESS_MAX_TENSORS];
  int32_t activation, reserved;
  int32_t running_var_biased, skip_nonfinite;
  long long ghost_batch;
  double renorm_rmax, renorm_dmax;
  int options_null, has_options_size, has_options_extra;
  long long options_size, options_extra;
} harness_case;

/* Storage for an options struct and what a newer header's version of it might append. */
typedef union {
  int64_t align_i;
  void* align_p;
  double align_d;
  unsigned char bytes[256];
} harness_options;

static int harness_fail(const char* what, const char* detail) {
  fprintf(stderr, "harness: %s %s\n", what, detail);
  return 2;
}

static int harness_dtype(const char* name, DLDataType* dt) {
  dt->lanes = 1;
  if (!strcmp(name, "float16")) { dt->code = kDLFloat; dt->bits = 16; }
  else if (!strcmp(name, "bfloat16")) { dt->code = kDLBfloat; dt->bits = 16; }
  else if (!strcmp(name, "float32")) { dt->code = kDLFloat; dt->bits = 32; }
  else if (!strcmp(name, "float64")) { dt->code = kDLFloat; dt->bits = 64; }
  else if (!strcmp(name, "int32")) { dt->code = kDLInt; dt->bits = 32; }
  else return 0;
  return 1;
}

static int harness_load(harness_tensor* h) {
  FILE* f = fopen(h->path, "rb");
  long size;
  if (!f) return harness_fail("cannot open", h->path);
  fseek(f, 0, SEEK_END);
  size = ftell(f);
  fseek(f, 0, SEEK_SET);
  h->bytes = (size_t)size;
  h->buffer = malloc(h->bytes ? h->bytes : 1);
  if (!h->buffer || fread(h->buffer, 1, h->bytes, f) != h->bytes) {
    fclose(f);
    return harness_fail("cannot read", h->path);
  }
  fclose(f);
  h->t.data = h->buffer;
  return 0;
}

static int harness_save(const harness_tensor* h) {
  char out[1040];
  FILE* f;
  sprintf(out, "%s.out", h->path);
  f = fopen(out, "wb");
  if (!f || fwrite(h->buffer, 1, h->bytes, f) != h->bytes) return harness_fail("cannot write", out);
  fclose(f);
  return 0;
}

static int harness_read(const char* path, harness_case* c) {
  FILE* f = fopen(path, "r");
  char key[32];
  memset(c, 0, sizeof *c);
  c->axis = 1;
  c->eps = 1e-5;
  c->momentum = 0.1;
  c->device_type = kDLCPU;
  if (!f) return harness_fail("cannot open", path);
  while (fscanf(f, "%31s", key) == 1) {
    if (!strcmp(key, "op")) {
      if (fscanf(f, "%31s", c->op) != 1) return harness_fail("bad op in", path);
    } else if (!strcmp(key, "axis")) {
      if (fscanf(f, "%d", &c->axis) != 1) return harness_fail("bad axis in", path);
    } else if (!strcmp(key, "eps")) {
      if (fscanf(f, "%lf", &c->eps) != 1) return harness_fail("bad eps in", path);
    } else if (!strcmp(key, "momentum")) {
      if (fscanf(f, "%lf", &c->momentum) != 1) return harness_fail("bad momentum in", path);
    } else if (!strcmp(key, "device")) {
      char device[32];
      if (fscanf(f, "%31s", device) != 1) return harness_fail("bad device in", path);
      c->device_type = strcmp(device, "cuda") ? kDLCPU : kDLCUDA;
    } else if (!strcmp(key, "activation")) {
      if (fscanf(f, "%d", &c->activation) != 1) return harness_fail("bad activation in", path);
    } else if (!strcmp(key, "reserved")) {
      if (fscanf(f, "%d", &c->reserved) != 1) return harness_fail("bad reserved in", path);
    } else if (!strcmp(key, "running_var_biased")) {
      if (fscanf(f, "%d", &c->running_var_biased) != 1) return harness_fail("bad running_var_biased in", path);
    } else if (!strcmp(key, "skip_nonfinite")) {
      if (fscanf(f, "%d", &c->skip_nonfinite) != 1) return harness_fail("bad skip_nonfinite in", path);
    } else if (!strcmp(key, "ghost_batch")) {
      if (fscanf(f, "%lld", &c->ghost_batch) != 1) return harness_fail("bad ghost_batch in", path);
    } else if (!strcmp(key, "renorm")) {
      if (fscanf(f, "%lf %lf", &c->renorm_rmax, &c->renorm_dmax) != 2) return harness_fail("bad renorm in", path);
    } else if (!strcmp(key, "options")) {
      char what[32];
      if (fscanf(f, "%31s", what) != 1) return harness_fail("bad options in", path);
      c->options_null = !strcmp(what, "null");
    } else if (!strcmp(key, "options_size")) {
      if (fscanf(f, "%lld", &c->options_size) != 1) return harness_fail("bad options_size in", path);
      c->has_options_size = 1;
    } else if (!strcmp(key, "options_extra")) {
      if (fscanf(f, "%lld", &c->options_extra) != 1) return harness_fail("bad options_extra in", path);
      c->has_options_extra = 1;
    } else if (!strcmp(key, "counts")) {
      int64_t i;
      long long v;
      if (fscanf(f, "%lld", &v) != 1 || v < 0 || v > HARNESS_MAX_TENSORS) return harness_fail("bad counts in", path);
      c->num_counts = (int64_t)v;
      for (i = 0; i < c->num_counts; ++i) {
        if (fscanf(f, "%lld", &v) != 1) return harness_fail("bad count in", path);
        c->counts[i] = (int64_t)v;
      }
    } else if (!strcmp(key, "tensor")) {
      harness_tensor* h;
      char dtype[32], strides[32];
      unsigned long long offset;
      int i, ndim;
      long long v;
      if (c->num_tensors == HARNESS_MAX_TENSORS) return harness_fail("too many tensors in", path);
      h = &c->tensors[c->num_tensors++];
      if (fscanf(f, "%31s %31s %1023s %llu %d", h->name, dtype, h->path, &offset, &ndim) != 5 || ndim < 0 ||
          ndim > 16 || !harness_dtype(dtype, &h->t.dtype))
        return harness_fail("bad tensor in", path);
      h->t.device.device_type = (DLDeviceType)c->device_type;
      h->t.device.device_id = 0;
      h->t.ndim = ndim;
      h->t.byte_offset = offset;
      h->t.shape = h->shape;
      for (i = 0; i < ndim; ++i) {
        if (fscanf(f, "%lld", &v) != 1) return harness_fail("bad shape in", path);
        h->shape[i] = (int64_t)v;
      }
      if (fscanf(f, "%31s", strides) != 1) return harness_fail("bad strides in", path);
      if (!strcmp(strides, "C")) {
        h->t.strides = NULL;
      } else {
        h->t.strides = h->strides;
        h->strides[0] = (int64_t)atoll(strides);
        for (i = 1; i < ndim; ++i) {
          if (fscanf(f, "%lld", &v) != 1) return harness_fail("bad strides in", path);
          h->strides[i] = (int64_t)v;
        }
      }
      if (harness_load(h)) return 2;
    } else {
      return harness_fail("unknown key in", path);
    }
  }
  fclose(f);
  return 0;
}

/* The tensor called `name`, or NULL when the case does not list it. */
static DLTensor* harness_get(harness_case* c, const char* name) {
  int i;
  for (i = 0; i < c->num_tensors; ++i)
    if (!strcmp(c->tensors[i].name, name)) return &c->tensors[i].t;
  return NULL;
}

/* Lays the case's options struct (`init`, `size` bytes, struct_size its first member) out in
 * `buf` as the case asks; returns the pointer to pass (NULL for `options null`). */
static const void* harness_options_of(const harness_case* c, const void* init, size_t size, harness_options* buf) {
  size_t struct_size = size;
  int64_t extra = (int64_t)c->options_extra;
  if (c->options_null) return NULL;
  memset(buf, 0, sizeof *buf);
  memcpy(buf->bytes, init, size);
  if (c->has_options_extra) {
    memcpy(buf->bytes + size, &extra, sizeof extra);
    struct_size = size + sizeof extra;
  }
  if (c->has_options_size) struct_size = (size_t)c->options_size;
  memcpy(buf->bytes, &struct_size, sizeof struct_size);
  return buf->bytes;
}

static int harness_run(const char* path) {
  harness_case* c = (harness_case*)malloc(sizeof(harness_case));
  bn_status status;
  int64_t count = -1;
  int i, rc;
  harness_options buf;
  if (!c) return harness_fail("out of memory for", path);
  rc = harness_read(path, c);
  if (rc) return rc;
#define T(name) harness_get(c, name)
#define OPTIONS(type, init) ((const type*)harness_options_of(c, &init, sizeof init, &buf))
  if (!strcmp(c->op, "statistics")) {
    status = bn_statistics(T("x"), c->axis, T("mean"), T("var"), &count, NULL);
  } else if (!strcmp(c->op, "merge_statistics")) {
    const DLTensor* means[HARNESS_MAX_TENSORS];
    const DLTensor* vars[HARNESS_MAX_TENSORS];
    char name[32];
    for (i = 0; i < c->num_counts; ++i) {
      sprintf(name, "means%d", i);
      means[i] = T(name);
      sprintf(name, "vars%d", i);
      vars[i] = T(name);
    }
    status = bn_merge_statistics(c->num_counts, means, vars, c->counts, T("mean"), T("var"), &count, NULL);
  } else if (!strcmp(c->op, "forward_training")) {
    status = bn_forward_training(T("x"), T("weight"), T("bias"), T("running_mean"), T("running_var"), c->momentum,
                                 c->eps, c->axis, T("y"), T("saved_mean"), T("saved_invstd"), NULL);
  } else if (!strcmp(c->op, "forward_inference")) {
    status = bn_forward_inference(T("x"), T("mean"), T("var"), T("weight"), T("bias"), c->eps, c->axis, T("y"), NULL);
  } else if (!strcmp(c->op, "backward")) {
    status = bn_backward(T("dy"), T("x"), T("saved_mean"), T("saved_invstd"), T("weight"), c->axis, T("dx"),
                         T("dweight"), T("dbias"), NULL);
  } else if (!strcmp(c->op, "forward_training_ex")) {
    bn_training_options o = BN_TRAINING_OPTIONS_INIT;
    o.residual = T("residual");
    o.activation = c->activation;
    o.reserved0 = c->reserved;
    o.running_var_biased = c->running_var_biased;
    o.skip_nonfinite = c->skip_nonfinite;
    o.ghost_batch = (int64_t)c->ghost_batch;
    o.renorm_rmax = c->renorm_rmax;
    o.renorm_dmax = c->renorm_dmax;
    o.renorm_r_out = T("renorm_r");
    o.renorm_d_out = T("renorm_d");
    status = bn_forward_training_ex(T("x"), T("weight"), T("bias"), T("running_mean"), T("running_var"), c->momentum,
                                    c->eps, c->axis, OPTIONS(bn_training_options, o), T("y"), T("saved_mean"),
                                    T("saved_invstd"), NULL);
  } else if (!strcmp(c->op, "forward_inference_ex")) {
    bn_inference_options o = BN_INFERENCE_OPTIONS_INIT;
    o.residual = T("residual");
    o.activation = c->activation;
    o.reserved0 = c->reserved;
    status = bn_forward_inference_ex(T("x"), T("mean"), T("var"), T("weight"), T("bias"), c->eps, c->axis,
                                     OPTIONS(bn_inference_options, o), T("y"), NULL);
  } else if (!strcmp(c->op, "backward_ex")) {
    bn_backward_options o = BN_BACKWARD_OPTIONS_INIT;
    o.y = T("y");
    o.dresidual_out = T("dresidual");
    o.activation = c->activation;
    o.reserved0 = c->reserved;
    o.renorm_r = T("renorm_r");
    o.renorm_d = T("renorm_d");
    o.ghost_batch = (int64_t)c->ghost_batch;
    status = bn_backward_ex(T("dy"), T("x"), T("saved_mean"), T("saved_invstd"), T("weight"), c->axis,
                            OPTIONS(bn_backward_options, o), T("dx"), T("dweight"), T("dbias"), NULL);
  } else if (!strcmp(c->op, "fold")) {
    status = bn_fold(T("kernel"), T("conv_bias"), T("mean"), T("var"), T("weight"), T("bias"), c->eps, c->axis,
                     T("kernel_out"), T("bias_out"), NULL);
  } else {
    return harness_fail("unknown op in", path);
  }
#undef T
#undef OPTIONS
  for (i = 0; i < c->num_tensors; ++i)
    if (harness_save(&c->tensors[i])) return 2;
  printf("status %d\ncount %lld\nerror %s\n", (int)status, (long long)count, bn_last_error());
  for (i = 0; i < c->num_tensors; ++i) free(c->tensors[i].buffer);
  free(c);
  return 0;
}
