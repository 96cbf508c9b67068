"""
What an exported forward may compute: allow-lists of pure tensor operators (torch ATen
packets) and MLX primitives. The evaluator reads the val rows, so an artifact that could
do anything but arithmetic on the tokens it is given and the weights it carries could
read them back (aten.from_file), see memory it was never given (aten.empty,
as_strided), talk to other processes (MLX distributed Send/Recv), run its own kernels
(MLX CustomKernel) or differ from call to call (random draws, written buffers).

Anything not listed is refused by name, so a new operator is added here on purpose,
after checking that it only computes. A research edit that needs one more pure
operator adds it here with the reason.
"""

from __future__ import annotations

FORWARD_RULES = "see 'What a forward may do' in program.md"

# ATen operator packets (torch.ops.aten.<packet>.<overload>; any overload). No in-place
# variants (add_): the exporter functionalizes the graph (run_decompositions), so an honest
# in-place op becomes its pure form, and a write to a buffer or an input shows up in the
# graph signature, which pt2check refuses.
_TORCH_PURE = """
    sym_size sym_numel sym_stride sym_storage_offset _assert_tensor_metadata _assert_scalar
    sym_constrain_range sym_constrain_range_for_size _local_scalar_dense
    view reshape _unsafe_view view_as reshape_as permute transpose t expand expand_as unsqueeze squeeze
    flatten unflatten contiguous clone alias detach slice select narrow split split_with_sizes chunk
    tensor_split unbind cat concat concatenate stack hstack vstack repeat repeat_interleave tile flip roll
    movedim swapaxes diagonal diag diag_embed unfold pad constant_pad_nd _to_copy to type_as copy
    lift_fresh_copy lift_fresh index_select index index_put gather take take_along_dim
    scatter scatter_add scatter_reduce index_add index_copy index_fill
    masked_fill masked_scatter where clamp clamp_min clamp_max clip fill
    zeros zeros_like ones ones_like full full_like arange scalar_tensor new_zeros new_ones new_full eye
    linspace tril triu tril_indices triu_indices one_hot embedding
    add sub rsub mul div floor_divide remainder fmod pow neg abs sign sgn reciprocal
    sqrt rsqrt exp exp2 expm1 log log2 log10 log1p sin cos tan sinh cosh tanh asin acos atan atan2 asinh
    acosh atanh sigmoid logit erf erfc erfinv floor ceil round trunc frac square maximum minimum max min
    amax amin sum mean prod var std var_mean std_mean norm linalg_vector_norm logsumexp cumsum cumprod
    cummax cummin logcumsumexp argmax argmin all any eq ne lt le gt ge logical_and logical_or logical_not
    logical_xor bitwise_and bitwise_or bitwise_not bitwise_xor __and__ __or__ __xor__ __invert__ lerp addcmul addcdiv hypot copysign
    nan_to_num isnan isinf isfinite signbit
    mm bmm addmm addbmm baddbmm addmv mv dot matmul einsum linear outer _weight_norm
    relu relu6 gelu silu mish softplus elu selu celu leaky_relu hardtanh hardsigmoid hardswish glu
    threshold prelu softmax _softmax log_softmax _log_softmax _safe_softmax
    layer_norm native_layer_norm rms_norm _fused_rms_norm group_norm native_group_norm
    _native_batch_norm_legit_no_training batch_norm
    scaled_dot_product_attention _scaled_dot_product_flash_attention _scaled_dot_product_efficient_attention
    _scaled_dot_product_cudnn_attention _scaled_dot_product_flash_attention_for_cpu
    _scaled_dot_product_fused_attention_overrideable
    topk sort argsort msort kthvalue median searchsorted bucketize
    conv1d conv2d convolution _convolution avg_pool1d max_pool1d max_pool1d_with_indices
"""
TORCH_OPS: frozenset[str] = frozenset(_TORCH_PURE.split())

# Sym-int arithmetic on sizes (B*T, B//2, comparisons): torch.export writes these as plain
# Python operators, resolved on load by getattr from `operator`, `torch` and `math`.
SYM_OPS: frozenset[str] = frozenset(
    [f"_operator.{op}" for op in ("eq", "ne", "le", "ge", "lt", "gt", "neg", "pos", "mul", "add", "sub",
                                  "floordiv", "mod", "pow", "truediv", "and_", "or_")]
    + [f"torch.{op}" for op in ("sym_not", "sym_int", "sym_float", "sym_ite", "sym_max", "sym_min", "sym_sqrt")]
    + ["math.trunc"])

# MLX primitives as MLX prints them (mx.export_to_dot labels). Load is how an imported
# function reads its own constants (MLX's importer makes it; the file format cannot name it).
_MLX_PURE = """
    Load Abs Add AddMM Arange ArcCos ArcCosh ArcSin ArcSinh ArcTan ArcTan2 ArcTanh ArgPartition ArgReduce
    ArgSort AsType BitwiseAnd BitwiseOr BitwiseXor LeftShift RightShift BitwiseInvert BlockMaskedMM
    Broadcast BroadcastAxes Ceil Concatenate Conjugate Contiguous Convolution Copy Cos Cosh Depends Divide
    DivMod Select Equal Erf ErfInv Exp Expm1 ExpandDims Flatten Floor Full Gather GatherAxis GatherMM
    Greater GreaterEqual Imag Less LessEqual Log Log2 Log10 Log1p LogicalNot LogicalAnd LogicalOr
    LogAddExp LogSumExp Matmul Maximum Minimum Multiply Negative NotEqual NumberOfElements Pad Partition
    Power Real Remainder Reshape Round Sum Prod Min Max And Or CumSum CumProd CumMax CumMin CumLogaddexp
    Scatter ScatterSum ScatterProd ScatterMax ScatterMin ScatterAxis Sigmoid Sign Sin Sinh Slice SliceUpdate
    DynamicSlice DynamicSliceUpdate Softmax Sort Split Sqrt Rsqrt Square Squeeze StopGradient Subtract Tan
    Tanh Transpose Unflatten View RMSNorm LayerNorm RoPE ScaledDotProductAttention
"""
MLX_PRIMITIVES: frozenset[str] = frozenset(_MLX_PURE.split())
