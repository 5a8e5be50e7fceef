"""The radiologist's side: a server-rendered review worklist over the audit log and the feedback store."""
