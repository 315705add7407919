//! The identity a pod is admitted for: userInfo, trusted controllers acting for a user, executors
//! inheriting their driver's identity and grants.
