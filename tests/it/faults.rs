//! Every Braze answer handled on purpose: one test per fault.
