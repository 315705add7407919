"""A Spark driver in client mode (tests/e2e.rs): with spark.kubernetes.driver.pod.name set, it
requests executor pods from the API server on behalf of that driver pod, then waits until the
file named by argv[1] exists (the test has seen what it needed) and stops."""

import os
import sys
import time

from pyspark.sql import SparkSession

spark = SparkSession.builder.getOrCreate()
print("e2e: spark context up, app id", spark.sparkContext.applicationId, flush=True)
deadline = time.time() + 180
while not os.path.exists(sys.argv[1]) and time.time() < deadline:
    time.sleep(0.2)
spark.stop()
