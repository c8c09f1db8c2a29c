"""What we know of Axolotl's config: its key names, the features we refuse, the keys that
change nothing here, and key by key what finetune does with the ones it shares.

Longer than the ~400-line guide because it is mostly data (Axolotl's key lists and the
semantics table); the logic is two small functions at the end.

Names only, read from Axolotl's schema (axolotl-ai-cloud/axolotl at 067b021c, 2026-07; its
pydantic config classes and plugin argument classes). A key in these sets that our schema
does not define is accepted quietly (it only steers Axolotl's own internals), reported in one
"ignored Axolotl keys" warning, or refused naming the Axolotl feature it asks for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

Problem = tuple[str, str]

if TYPE_CHECKING:
    from finetune.config.schema import FinetuneConfig

AXOLOTL_TOP_LEVEL_KEYS = frozenset(
    """
    accelerator_config activation_offloading adam_beta1 adam_beta2 adam_beta3 adam_epsilon
    adam_epsilon2 adapter added_tokens_overrides attn_implementation auto_find_batch_size
    auto_resume_from_checkpoints axolotl_config_path base_model base_model_config
    batch_flattening batch_size bench_dataset bench_split bf16 bfloat16 bnb_config_kwargs
    center_rewards_coefficient chat_template chat_template_jinja chat_template_kwargs
    chunked_cross_entropy chunked_cross_entropy_num_chunks cls_model_config comet_api_key
    comet_experiment_config comet_experiment_key comet_mode comet_online comet_project_name
    comet_workspace context_parallel_size cosine_constant_lr_ratio cosine_min_lr_ratio cpo_alpha
    curriculum_sampling dataloader_drop_last dataloader_num_workers dataloader_pin_memory
    dataloader_prefetch_factor dataset_exact_deduplication dataset_keep_in_memory
    dataset_num_proc dataset_prepared_path dataset_processes dataset_shard_idx dataset_shard_num
    datasets ddp ddp_broadcast_buffers ddp_bucket_cap_mb ddp_find_unused_parameters ddp_timeout
    deepcompile deepspeed default_system_message device device_map dion_lr dion_momentum
    dion_rank_fraction dion_rank_multiple_of do_bench_eval do_causal_lm_eval dp_replicate_size
    dp_shard_size dpo_beta dpo_generate_during_eval dpo_label_smoothing dpo_loss_type
    dpo_loss_weights dpo_norm_loss dpo_padding_free dpo_use_liger_kernel dpo_use_logits_to_keep
    dpo_use_weighting dynamic_checkpoint eaft_alpha eaft_k eager_attention
    early_stopping_patience ebft embedding_lr embedding_lr_scale embeddings_skip_upcast
    eot_tokens eval_batch_size eval_causal_lm_metrics eval_max_new_tokens eval_sample_packing
    eval_sequence_len eval_steps eval_strategy eval_table_size evals_per_epoch
    evaluation_strategy excess_length_strategy experimental_skip_move_to_device
    experts_implementation fix_untrained_tokens flash_attention flash_attn_cross_entropy
    flash_attn_d512 flash_attn_fuse_mlp flash_attn_rms_norm flash_optimum flex_attention
    flex_attn_compile_kwargs float16 float32 fp16 fp32_norm_classes fp32_norms fp8
    fp8_enable_fsdp_float8_all_gather freeze_mm_modules fsdp fsdp_config
    fsdp_final_state_dict_type fsdp_version fused_attn_kernel gc_collect_steps gc_steps
    gemma4_hybrid_attn_impl generate_samples generation_do_sample generation_max_new_tokens
    generation_prompt_ratio generation_temperature generation_top_k generation_top_p gptq
    gpu_memory_limit gradient_accumulation_steps gradient_checkpointing
    gradient_checkpointing_kwargs gradio_max_new_tokens gradio_server_name gradio_server_port
    gradio_share gradio_temperature gradio_title greater_is_better group_by_length
    heads_k_stride hf_mlflow_log_artifacts hf_use_auth_token hub_model_id hub_revision
    hub_strategy image_resize_algorithm image_size include_tkps include_tokens_per_second
    is_falcon_derived_model is_llama_derived_model is_mistral_derived_model is_preprocess
    is_qwen_derived_model jagged_restart_anneal_steps jagged_restart_steps
    jagged_restart_warmup_steps kto_desirable_weight kto_undesirable_weight large_head_attention
    layer_offloading learning_rate lisa_layers_attribute lisa_n_layers lisa_step_interval
    llama4_linearized_experts load_best_model_at_end load_in_4bit load_in_8bit local_rank
    logging_steps lora_alpha lora_alpha_pattern lora_dropout lora_embedding_kernel
    lora_fan_in_fan_out lora_mlp_kernel lora_model_dir lora_modules_to_save lora_o_kernel
    lora_on_cpu lora_qkv_kernel lora_r lora_rank_pattern lora_target_linear lora_target_modules
    lora_target_parameters loraplus_lr_embedding loraplus_lr_ratio loss_watchdog_patience
    loss_watchdog_threshold low_cpu_mem_usage lr_div_factor lr_groups lr_quadratic_warmup
    lr_scheduler lr_scheduler_kwargs max_grad_norm max_memory max_packed_sequence_len
    max_prompt_len max_steps mean_resizing_embeddings merge_lora merge_method
    metric_for_best_model micro_batch_size min_sample_len mlflow_experiment_name mlflow_run_name
    mlflow_tracking_uri model_config model_kwargs model_quantization_config
    model_quantization_config_kwargs model_revision model_type multipack_real_batches
    neftune_noise_alpha noisy_embedding_alpha num_dataset_shards_to_save num_epochs
    num_generation_samples num_labels optim_args optim_target_modules optimizer orpo_alpha
    otel_metrics_host otel_metrics_port output_dir overrides_of_model_config
    overrides_of_model_kwargs pad_to_multiple_of pad_to_sequence_len peft
    peft_autocast_adapter_dtype peft_ensure_weight_tying peft_init_lora_weights
    peft_layer_replication peft_layers_pattern peft_layers_to_transform
    peft_trainable_token_indices peft_use_dora peft_use_rslora plugins pose_max_context_len
    pose_num_chunks pose_split_on_token_ids precompute_ref_log_probs preprocess_iterable
    pretrain_multipack_attn pretrain_multipack_buffer_size pretraining_dataset
    pretraining_sample_concatenation process_reward_model processor_kwargs processor_type
    profiler_steps profiler_steps_start push_dataset_to_hub qat qgalore_cos_threshold
    qgalore_gamma_proj qgalore_proj_bits qgalore_proj_group_size qgalore_proj_quant
    qgalore_proj_type qgalore_queue_size qgalore_rank qgalore_scale qgalore_update_proj_gap
    qlora_sharded_model_loading quantization quantize_moe_experts ray_num_workers ray_run_name
    reinit_weights relora relora_cpu_offload relora_prune_method relora_prune_ratio
    remove_unused_columns resize_token_embeddings_to_32x resources_per_worker
    resume_from_checkpoint revision_of_model reward_model ring_attn_func rl rl_beta
    role_boundaries rope_scaling rpo_alpha s2_attention sage_attention sample_packing
    sample_packing_bin_size sample_packing_eff_est sample_packing_group_size
    sample_packing_mp_start_method sample_packing_sequentially save_first_step save_only_model
    save_safetensors save_steps save_strategy save_total_limit saves_per_epoch scaling_softmax
    scaling_softmax_bias scaling_softmax_factor sdp_attention sdpa_varlen seed
    selective_checkpointing sequence_len sequence_parallel_degree shrink_embeddings
    shuffle_before_merging_datasets shuffle_merged_datasets simpo_gamma skip_prepare_dataset
    special_tokens streaming streaming_multipack_buffer_size strict tensor_parallel_size
    test_datasets tf32 tiled_mlp tiled_mlp_num_shards tiled_mlp_use_original_mlp
    tokenizer_config tokenizer_legacy tokenizer_save_jinja_files tokenizer_type
    tokenizer_use_fast tokenizer_use_mistral_common tokens torch_compile torch_compile_backend
    torch_compile_mode torch_compile_options torch_empty_cache_steps torchdistx_path
    total_num_tokens total_supervised_tokens trackio_project_name trackio_run_name
    trackio_space_id train_on_inputs trainer_cls trl trust_remote_code type_of_model
    unfrozen_parameters unsloth_cross_entropy_loss unsloth_lora_mlp unsloth_lora_o
    unsloth_lora_qkv unsloth_rms_norm unsloth_rope use_comet use_eaft use_kernels use_mlflow
    use_onebitllms use_otel_metrics use_pose use_ray use_tensorboard use_trackio use_wandb
    val_set_size vllm wandb_entity wandb_log_model wandb_mode wandb_name wandb_project
    wandb_run_id wandb_watch warmup_ratio warmup_steps weight_decay world_size
    xformers_attention
    """.split()
)

# Keys of Axolotl's plugins (`plugins:` entries): cut_cross_entropy, liger, kernels, swanlab,
# kd, spectrum, grokfast, lm_eval, expert_parallel, ...
AXOLOTL_PLUGIN_KEYS = frozenset(
    """
    cut_cross_entropy dense_mixer diffusion dsv4_bf16_all dsv4_fp4_grouped_mode
    dsv4_fp8_lora_kernel dsv4_fp8_nonexpert_mode dsv4_shared_mlp_lora_kernel expert_backend
    expert_parallel_backend expert_parallel_fallback_on_unsupported
    expert_parallel_num_nvl_bytes expert_parallel_num_rdma_bytes expert_parallel_size
    expert_parallel_token_capacity gemma4_fp8_nonexpert gemma4_nf4_nonexpert grokfast_alpha
    grokfast_lamb hatchery kd_alpha kd_beta kd_ce_alpha kd_normalize_topk kd_online_server
    kd_online_server_base_url kd_online_timeout kd_online_topk kd_temperature kd_temperature_min
    kd_trainer liger_cross_entropy liger_fused_linear_cross_entropy liger_glu_activation
    liger_layer_norm liger_rms_norm liger_rms_norm_gated liger_rope liger_swiglu
    liger_use_token_scaling llmcompressor lm_eval_batch_size lm_eval_model lm_eval_post_train
    lm_eval_tasks moe_bnb_fast moe_dequant_chunk_size moe_grouped_backend mora
    nemo_gym_auto_clone nemo_gym_auto_start nemo_gym_config_paths nemo_gym_datasets nemo_gym_dir
    nemo_gym_enabled nemo_gym_head_port nemo_gym_max_turns nemo_gym_model_name
    nemo_gym_multi_turn nemo_gym_run_timeout nemo_gym_server_timeout nemo_gym_verify_timeout
    nonexpert_quantization nvfp4_merge_aware nvfp4_merge_aware_start_step spectrum_model_name
    spectrum_top_fraction swanlab_api_host swanlab_api_key swanlab_completion_log_interval
    swanlab_completion_max_buffer swanlab_description swanlab_experiment_name
    swanlab_lark_secret swanlab_lark_webhook_url swanlab_log_completions swanlab_log_model
    swanlab_mode swanlab_project swanlab_web_host swanlab_workspace use_dsv4_kernels
    use_glm_dsa_kernels use_scattermoe use_sonicmoe use_swanlab
    """.split()
)

AXOLOTL_DATASET_KEYS = frozenset(
    """
    chat_template chat_template_jinja conversation data_files drop_system_message ds_type field
    field_chosen field_human field_messages field_model field_rejected field_thinking
    field_tools input_format input_transform length logprobs_field max_completion_length
    max_input_id message_field_content message_field_role message_field_training
    message_field_training_detail message_property_mappings min_input_id name path
    preprocess_shards revision roles roles_to_train seed sequence_length shards shards_idx split
    split_thinking step_separator temperature template_thinking_key train_on_eos train_on_eot
    train_on_last_step_only trust_remote_code type
    """.split()
)

# Keys of older Axolotl releases that its current schema dropped; still found in its examples.
AXOLOTL_LEGACY_KEYS = frozenset("gptq_groupsize gptq_model_v1 gptq_disable_exllama".split())

# Keys that steer Axolotl's own internals (its model-class guessing, its launcher, values it
# computes and writes back, its own speed-ups that do not change what is trained, its log
# extras) and change nothing here: accepted without a word.
AXOLOTL_QUIET_KEYS = frozenset(
    """
    axolotl_config_path capabilities dataloader_num_workers debug dataloader_pin_memory
    dataloader_prefetch_factor device device_map env_capabilities experimental_skip_move_to_device
    flash_attn_cross_entropy flash_attn_fuse_mlp flash_attn_rms_norm flash_optimum
    include_tkps include_tokens_per_second is_falcon_derived_model is_llama_derived_model
    is_mistral_derived_model is_preprocess is_qwen_derived_model local_rank low_cpu_mem_usage
    lora_embedding_kernel lora_mlp_kernel lora_o_kernel lora_qkv_kernel model_type
    multipack_real_batches processor_kwargs sample_packing_bin_size sample_packing_eff_est
    sample_packing_group_size sample_packing_mp_start_method save_safetensors strict
    tokenizer_type total_num_tokens total_supervised_tokens type_of_model world_size
    """.split()
)

# Plugins whose keys only change speed or logging: ignored with the other keys. Any other
# plugin changes what is trained and is refused.
IGNORABLE_PLUGINS = (
    "cut_cross_entropy",
    "liger",
    "kernels",
    "swanlab",
    "lm_eval",
    "expert_parallel",
)


def _truthy(value: Any) -> bool:
    return value not in (None, False, "", [], {}, 0)


def _loftq(value: Any) -> bool:
    return isinstance(value, dict) and bool(value.get("loftq_config"))


def _above_one(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 1


# Axolotl features finetune does not implement, refused by name: (key, asks for it, what).
UNSUPPORTED_FEATURES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("rl", _truthy, "preference / RL training (DPO, KTO, ORPO, GRPO, EBFT)"),
    ("reward_model", _truthy, "reward-model training"),
    ("process_reward_model", _truthy, "process-reward-model training"),
    ("processor_type", _truthy, "multimodal (vision/audio) models"),
    ("image_size", _truthy, "multimodal (vision/audio) models"),
    ("freeze_mm_modules", _truthy, "multimodal (vision/audio) models"),
    ("gptq", _truthy, "GPTQ-quantized base models"),
    ("model_quantization_config", _truthy, "pre-quantized (MXFP4 / FP8) base models"),
    ("quantize_moe_experts", _truthy, "quantized MoE expert weights"),
    ("lora_target_parameters", _truthy, "LoRA on bare (MoE expert) parameters"),
    ("pretraining_dataset", _truthy, "streaming pretraining datasets"),
    ("streaming", _truthy, "streaming datasets"),
    ("context_parallel_size", _above_one, "context (sequence) parallelism"),
    ("sequence_parallel_degree", _above_one, "context (sequence) parallelism"),
    ("tensor_parallel_size", _above_one, "tensor parallelism"),
    ("dp_shard_size", _above_one, "N-D parallelism (dp_shard_size)"),
    ("expert_parallel_size", _above_one, "expert parallelism"),
    ("relora", _truthy, "ReLoRA"),
    ("lisa_n_layers", _truthy, "LISA layer-wise training"),
    ("unfrozen_parameters", _truthy, "partial full fine-tuning (unfrozen_parameters)"),
    ("qat", _truthy, "quantization-aware training"),
    ("quantization", _truthy, "post-training quantization"),
    ("fp8", _truthy, "fp8 training"),
    ("use_ray", _truthy, "Ray training"),
    ("peft_layer_replication", _truthy, "LoRA layer replication"),
    ("use_pose", _truthy, "PoSE context extension"),
    ("peft", _loftq, "LoftQ initialisation (peft.loftq_config)"),
)

# Dataset `type:` values of Axolotl that finetune does not implement, with a pointer.
AXOLOTL_DATASET_TYPE_HINTS = {
    "sharegpt": "Axolotl replaced it with `type: chat_template`; keep your file and set "
    "`message_property_mappings: {role: from, content: value}` (and `field_messages: "
    "conversations`)",
}

# Axolotl's optimizers that are its own code, not the HF Trainer's.
AXOLOTL_OWN_OPTIMIZERS = frozenset(
    """
    optimi_adamw ao_adamw_4bit ao_adamw_8bit ao_adamw_fp8 adopt_adamw came_pytorch muon dion
    sinkgd flash_adamw flash_adam flash_sgd flash_sgdw flash_lion q_galore_adamw8bit
    """.split()
)

# Axolotl's chat template names (its ChatTemplate enum).
AXOLOTL_CHAT_TEMPLATES = frozenset(
    """
    alpaca chatml mistral_v1 mistral_v2v3 mistral_v3_tekken mistral_v7_tekken gemma cohere llama3
    llama3_2_vision llama4 phi_3 phi_35 deepseek_v2 deepseek_v3 jamba jinja qwen_25 qwen3 qwen3_5
    falcon_h1 nemotron_h tokenizer_default exaone exaone4 metharme pixtral llava qwen2_vl gemma3
    gemma3n gemma4 gemma4_unified command_a command_a_tool_use command_a_rag aya
    """.split()
)


def unsupported_features(raw: dict[str, Any]) -> list[Problem]:
    """Axolotl features finetune does not implement, named so the user knows what is missing."""
    problems = [
        (key, f"{what} is an Axolotl feature finetune does not support")
        for key, asks, what in UNSUPPORTED_FEATURES
        if key in raw and asks(raw[key])
    ]
    adapter = raw.get("adapter")
    if adapter == "dora":
        problems.append(("adapter", "DoRA is `adapter: lora` with `peft_use_dora: true`"))
    elif isinstance(adapter, str) and adapter not in ("lora", "qlora"):
        problems.append(
            ("adapter", f"{adapter} is not supported; finetune trains lora or qlora adapters")
        )
    plugins = raw.get("plugins") or []
    for plugin in plugins if isinstance(plugins, list) else [plugins]:
        if not any(name in str(plugin).lower() for name in IGNORABLE_PLUGINS):
            problems.append(
                (
                    "plugins",
                    f"{plugin} is an Axolotl plugin finetune does not have, and it changes what "
                    "is trained; remove it",
                )
            )
    return problems


def differences_worth_a_word(config: FinetuneConfig) -> list[str]:
    """Where this config asks for something finetune does differently from Axolotl, or that
    cannot happen here: said once, at load."""
    notes = []
    if not config.has_eval_data():
        for key in ("eval_steps", "evals_per_epoch"):
            if getattr(config, key) is not None:
                notes.append(
                    f"{key}: skipped: there is nothing to evaluate (val_set_size is 0 and no "
                    "test_datasets), as in Axolotl"
                )
    if not config.tokenizer_use_fast:
        notes.append(
            "tokenizer_use_fast: false: finetune masks labels by character offsets, which only "
            "fast tokenizers give, so it loads the fast one (the same tokens wherever a model "
            "ships both)"
        )
    if config.adapter == "lora" and config.load_in_4bit:
        notes.append(
            "load_in_4bit with adapter: lora loads the base in 4-bit (QLoRA), as asked; Axolotl "
            "would load it unquantized with `adapter: lora` (say `adapter: qlora` to be clear)"
        )
    if config.mlflow_enabled() and config.run_name() != config.mlflow_run_name:
        notes.append(
            "mlflow_run_name: the MLflow run is named after wandb_name, as in Axolotl (the "
            "Trainer has one run name)"
        )
    return notes


SAME = "same"

# Every key finetune accepts, against what Axolotl (067b021c) does with it: "same", or the
# difference. tests/test_cli.py checks that every schema key is here and
# that the README's "Differences from Axolotl" table is generated from it.
SEMANTICS: dict[str, str] = {
    "base_model": SAME,
    "base_model_config": SAME,
    "revision_of_model": SAME,
    "tokenizer_config": SAME,
    "tokenizer_use_fast": "false still loads the fast tokenizer (label masking needs its character "
    "offsets), with a warning",
    "trust_remote_code": SAME,
    "attn_implementation": "sdpa, eager or flash_attention_2; Axolotl's other backends (flex, "
    "xformers, sage, hub kernels) are refused by name; packed rows use exact per-sample attention",
    "flash_attention": SAME,
    "sdp_attention": SAME,
    "load_in_4bit": "with `adapter: lora` the base is still loaded in 4-bit, with a warning "
    "(Axolotl loads it unquantized unless `adapter: qlora`)",
    "load_in_8bit": SAME,
    "bnb_config_kwargs": SAME,
    "adapter": "lora or qlora; `dora` points to peft_use_dora, other adapters are refused",
    "lora_model_dir": SAME,
    "lora_r": "default 8 (Axolotl has none)",
    "lora_alpha": "default 16 (Axolotl has none)",
    "lora_dropout": SAME,
    "lora_target_modules": SAME,
    "lora_target_linear": SAME,
    "lora_modules_to_save": SAME,
    "lora_fan_in_fan_out": SAME,
    "peft_use_dora": SAME,
    "peft_use_rslora": SAME,
    "datasets": SAME,
    "test_datasets": SAME,
    "dataset_prepared_path": "the cache key also covers seed, val_set_size and finetune's "
    "version, so a changed split never reuses a stale cache",
    "dataset_processes": "threads of the Rust tokenizer (Axolotl: processes of datasets.map)",
    "shuffle_merged_datasets": SAME,
    "chat_template": "the names finetune ships (see vocabulary); other Axolotl names are refused "
    "with a pointer to tokenizer_default / chat_template_jinja",
    "chat_template_jinja": SAME,
    "eot_tokens": "the markers searched after each turn; without it, the template's own "
    "end-of-turn marker (Axolotl: the EOS token)",
    "default_system_message": "added to conversations without a system turn for every template "
    "(Axolotl: only with chat_template: chatml)",
    "train_on_inputs": SAME,
    "special_tokens": SAME,
    "tokens": SAME,
    "sequence_len": SAME,
    "excess_length_strategy": SAME,
    "sample_packing": "packed rows are not padded to sequence_len unless pad_to_sequence_len is "
    "set (Axolotl pads them)",
    "eval_sample_packing": SAME,
    "pad_to_sequence_len": "default false even with sample_packing (Axolotl: true there)",
    "micro_batch_size": SAME,
    "gradient_accumulation_steps": "default batch_size / micro_batch_size, else 1 (Axolotl's "
    "documented rule; its code materialises 1 first)",
    "batch_size": "sets gradient_accumulation_steps = batch_size / micro_batch_size, as "
    "documented; a value that does not divide is an error",
    "num_epochs": SAME,
    "max_steps": SAME,
    "optimizer": "the HF Trainer's optimizers (default adamw_torch; Axolotl: adamw_torch_fused, "
    "the same maths); Axolotl's own optimizers are refused by name",
    "lr_scheduler": "the HF Trainer's schedules; Axolotl's one_cycle and rex are refused",
    "lr_scheduler_kwargs": SAME,
    "learning_rate": "default 2e-4 (Axolotl requires it)",
    "warmup_steps": SAME,
    "warmup_ratio": SAME,
    "weight_decay": SAME,
    "max_grad_norm": SAME,
    "adam_beta1": SAME,
    "adam_beta2": SAME,
    "adam_epsilon": SAME,
    "seed": "default 42 for everything (Axolotl leaves the data shuffle unseeded without it)",
    "resume_from_checkpoint": SAME,
    "auto_resume_from_checkpoints": "never resumes into a finished run, nor a checkpoint of "
    "another run",
    "cosine_min_lr_ratio": SAME,
    "output_dir": SAME,
    "val_set_size": "a seeded random sample of the rows (Axolotl: the last rows after its shuffle)",
    "eval_steps": "without eval data: skipped with a warning, as in Axolotl",
    "evals_per_epoch": "without eval data: skipped with a warning, as in Axolotl",
    "eval_batch_size": SAME,
    "save_steps": "with early_stopping_patience, replaced by the evaluation interval (with a "
    "note) unless it is a multiple of it (Axolotl refuses such a config)",
    "saves_per_epoch": "as save_steps",
    "save_total_limit": "default: keep every checkpoint (Axolotl: 4)",
    "early_stopping_patience": "needs eval data (an error without it)",
    "loss_watchdog_threshold": "counts logged losses (Axolotl counts steps re-reading the last "
    "log; the same with logging_steps: 1)",
    "loss_watchdog_patience": SAME,
    "bf16": "auto also counts CPUs with native bf16 (AVX512-BF16, AMX); on a CPU without it, "
    "fp32 (Axolotl turns fp16 on, which a CPU cannot run)",
    "fp16": SAME,
    "tf32": SAME,
    "gradient_checkpointing": "non-reentrant by default (Axolotl: use_reentrant: true); "
    "`offload` (or Axolotl's `activation_offloading: true`) needs a CUDA GPU",
    "gradient_checkpointing_kwargs": SAME,
    "deepspeed": "also found in the config's folder and by bundled name (zero1, zero2, zero3, "
    "zero3_offload); a missing file is an error at once",
    "fsdp_version": "2 only: FSDP2 through Accelerate, on CUDA GPUs with one process per GPU "
    "(refused on CPU, where Accelerate would train unsharded). Unset with fsdp_config means 1, as "
    "in Axolotl, and FSDP1 is refused by `train` with a pointer to fsdp_version: 2; set without "
    "fsdp_config, an error (Axolotl ignores it)",
    "fsdp_config": "checkpoints and the final adapter are always the whole adapter "
    "(SHARDED_STATE_DICT is saved as FULL_STATE_DICT, with a note); FSDP1's sharding_strategy "
    "sets reshard_after_forward (Axolotl's FSDP2 drops it) and its other FSDP1 keys do nothing, "
    "as in Axolotl; activation_checkpointing replaces gradient_checkpointing; an unknown key, "
    "mixed_precision_policy or cpu_offload_pin_memory: false is an error",
    "fsdp": "with fsdp_version: 2, full_shard / shard_grad_op set reshard_after_forward and "
    "offload sets offload_params; FSDP1-only strategies are errors; without fsdp_version it "
    "means FSDP1, refused by `train`",
    "ddp_timeout": SAME,
    "ddp_find_unused_parameters": SAME,
    "logging_steps": "default 1 (Axolotl: 0.5% of the steps, 1 to 10)",
    "use_tensorboard": SAME,
    "use_wandb": SAME,
    "wandb_project": SAME,
    "wandb_entity": SAME,
    "wandb_name": SAME,
    "wandb_mode": SAME,
    "wandb_run_id": SAME,
    "use_mlflow": SAME,
    "mlflow_tracking_uri": "also turns MLflow on (Axolotl: only mlflow_experiment_name does)",
    "mlflow_experiment_name": SAME,
    "mlflow_run_name": SAME,
    "hub_model_id": "uploaded only when asked, by `finetune push CONFIG` once the run is done "
    "(Axolotl's Trainer pushes during training)",
    "hub_strategy": "steers `finetune push --what adapter`: checkpoint / all_checkpoints also "
    "upload the newest / every checkpoint-N under its own name (the Trainer pushes while "
    "training, the newest as last-checkpoint/)",
    "hub_private_repo": "not an Axolotl key (the HF Trainer's name): whether `finetune push` "
    "creates the repo private",
}

DATASET_SEMANTICS: dict[str, str] = {
    "path": "relative paths: the working directory, then the config's folder",
    "type": "alpaca, alpaca:chatml, alpaca_chat (alpaca:chat), alpaca:phi, alpaca_chat.load_qa, "
    "chat_template (chat_template.default), completion, input_output or a custom mapping; "
    "sharegpt points to chat_template",
    "ds_type": SAME,
    "data_files": SAME,
    "split": SAME,
    "name": SAME,
    "revision": SAME,
    "field": SAME,
    "field_messages": SAME,
    "message_property_mappings": SAME,
    "message_field_role": SAME,
    "message_field_content": SAME,
    "message_field_training": SAME,
    "roles": "adds aliases to the default role names (Axolotl replaces them)",
    "roles_to_train": SAME,
    "train_on_eos": SAME,
    "chat_template": SAME,
    "chat_template_jinja": SAME,
    "drop_system_message": SAME,
    "field_thinking": "read as the reasoning key of the data's messages (Axolotl's is "
    "effectively unused)",
    "split_thinking": SAME,
    "template_thinking_key": SAME,
}
