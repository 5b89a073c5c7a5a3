"""Token datasets for the AR model: megatron-core IndexedDataset files + per-token loss masks."""
from megatron_xomni.datasets.token_files import TokenFileWriter, token_file_paths
from megatron_xomni.datasets.gpt import XOmniGPTDataset, build_train_valid_datasets

__all__ = ["TokenFileWriter", "token_file_paths", "XOmniGPTDataset", "build_train_valid_datasets"]
