//! Which kind of pod this is, and which containers receive secrets.
