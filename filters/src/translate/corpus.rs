//! Request corpus.
