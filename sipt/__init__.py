"""sipt: Self-Improving Pretraining as a toolkit of resumable, Parquet-in/Parquet-out stages."""

__version__ = "0.1.0"
