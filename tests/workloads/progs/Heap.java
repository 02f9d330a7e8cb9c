// In the container: a JVM holding MIB MiB of long[] chunks (1 MiB each), every chunk's
// contents a function of (chunk, its generation). Each round rewrites a few chunks with
// a new generation, then checks every long of every chunk, and prints "J <round>"; a
// wrong value prints "BAD chunk <c> index <i>" and exits. Four more threads allocate and
// drop garbage so that the collector has work (and the JVM its usual threads).
public class Heap {
    static final int LONGS = 1 << 17;                     // 1 MiB of longs

    static long val(int c, int g, int i) {
        return ((long) c << 40) ^ ((long) g << 20) ^ (i * 0x9E3779B97F4A7C15L);
    }

    static void fill(long[] a, int c, int g) {
        for (int i = 0; i < LONGS; i++) a[i] = val(c, g, i);
    }

    public static void main(String[] args) throws Exception {
        int n = Integer.parseInt(args[0]);
        long[][] chunks = new long[n][];
        int[] gen = new int[n];
        for (int c = 0; c < n; c++) {
            chunks[c] = new long[LONGS];
            fill(chunks[c], c, 0);
        }
        for (int t = 0; t < 4; t++) {
            Thread th = new Thread(() -> {
                long sink = 0;
                while (true) {
                    byte[] junk = new byte[64 << 10];
                    sink += junk.length;
                    try { Thread.sleep(2); } catch (InterruptedException e) { return; }
                }
            });
            th.setDaemon(true);
            th.start();
        }
        System.out.println("READY " + n);
        for (long round = 1; ; round++) {
            for (int k = 0; k < 8; k++) {
                int c = (int) ((round * 8 + k) % n);
                gen[c]++;
                fill(chunks[c], c, gen[c]);
            }
            for (int c = 0; c < n; c++) {
                long[] a = chunks[c];
                for (int i = 0; i < LONGS; i++) {
                    if (a[i] != val(c, gen[c], i)) {
                        System.out.println("BAD chunk " + c + " index " + i);
                        System.exit(1);
                    }
                }
            }
            System.out.println("J " + round);
            Thread.sleep(50);
        }
    }
}
