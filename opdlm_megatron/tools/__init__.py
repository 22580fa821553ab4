"""Checkpoint tools: HF <-> Megatron conversion and the offline SmolLM2 demo model.

* ``convert_hf_to_megatron.convert`` / ``opdlm-convert-hf-to-megatron``
* ``convert_megatron_to_hf.export`` / ``opdlm-convert-megatron-to-hf``
* ``prepare_smollm2.ensure_smollm2`` / ``opdlm-prepare-smollm2``

``hf_mapping`` holds the config/name/layout correspondence, ``hf_io`` the file handling.
"""
